"""Resolution hierarchies: which meshes exist, how data moves between them.

Level ``j = 0`` is the finest mesh ``h`` (the training images' own resolution)
and level ``j`` has mesh size ``2^j h``, so a ``size x size`` image becomes
``size / 2^j`` pixels a side on level ``j``. A :class:`Hierarchy` fixes, before
any compute:

* the number of levels ``L`` and the finest side ``size``;
* how an image is carried to a coarser level (``subsample``):

  - ``"coarsen"``: restrict the whole image to the coarser mesh. The restriction
    ``R_h^{2h}`` is one of ``"average"`` (mean over 2x2 blocks, the operator the
    MGE paper's analysis in Appendix A.1 assumes, and the default),
    ``"bilinear"`` (``jax.image.resize`` without antialiasing, which for an exact
    factor 2 samples the same 2x2 block centres) or ``"nearest"`` (keep the
    top-left pixel of each block, ``F.interpolate``'s default in the authors'
    code).
  - ``"crop"``: keep a random window of half the side, same mesh size.
  - ``"coarsen+crop"``: alternate: odd steps crop, even steps coarsen, so level
    ``j`` has side ``size / 2^j`` as in the other two modes.

* per-level batch sizes ``N_j`` (the reference code doubles them toward the
  coarse levels, ``N_j = 2^j N_0``, as in Appendix B) and, for
  Full-Multiscale, per-stage iteration counts.

An invalid hierarchy raises :class:`HierarchyError` in ``__post_init__``,
before anything is compiled.

Example:
  >>> h = Hierarchy(levels=4, size=64, base_batch=16)
  >>> h.sizes
  (64, 32, 16, 8)
  >>> h.batch_sizes
  (16, 32, 64, 128)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp

SUBSAMPLE_MODES = ("coarsen", "crop", "coarsen+crop")
RESTRICTIONS = ("average", "bilinear", "nearest")
MIN_RECOMMENDED_SIDE = 8


class HierarchyError(ValueError):
  """An invalid resolution hierarchy (raised before any compute)."""


class CoarseMeshWarning(UserWarning):
  """The coarsest mesh is smaller than the papers' recommended 8x8 pixels."""


@dataclasses.dataclass(frozen=True)
class Hierarchy:
  """A static description of the meshes used by MGE and Full-Multiscale.

  Attributes:
    levels: number of levels ``L >= 1``.
    size: side of the finest (level 0) square image, divisible by
      ``2^(L-1)``.
    base_batch: ``N_0``, the batch on the finest level.
    batch_sizes: optional explicit ``(N_0, ..., N_{L-1})``; default
      ``N_j = base_batch * batch_growth^j``.
    batch_growth: growth factor toward the coarse levels (2 in the reference
      code and Appendix B).
    subsample: one of :data:`SUBSAMPLE_MODES`.
    restriction: one of :data:`RESTRICTIONS` (used when coarsening).
  """

  levels: int
  size: int
  base_batch: int = 16
  batch_sizes: tuple[int, ...] | None = None
  batch_growth: int = 2
  subsample: str = "coarsen"
  restriction: str = "average"

  def __post_init__(self):
    if not isinstance(self.levels, int) or self.levels < 1:
      raise HierarchyError(f"levels must be a positive integer, got {self.levels!r}")
    if not isinstance(self.size, int) or self.size < 1:
      raise HierarchyError(f"size must be a positive integer, got {self.size!r}")
    factor = 2 ** (self.levels - 1)
    if self.size % factor:
      raise HierarchyError(
          f"image side {self.size} is not divisible by 2^(L-1) = {factor} for "
          f"L = {self.levels} levels; use a side that is a multiple of {factor} "
          f"(e.g. {max(factor, (self.size // factor) * factor)}) or fewer levels")
    if self.subsample not in SUBSAMPLE_MODES:
      raise HierarchyError(
          f"subsample must be one of {SUBSAMPLE_MODES}, got {self.subsample!r}")
    if self.restriction not in RESTRICTIONS:
      raise HierarchyError(
          f"restriction must be one of {RESTRICTIONS}, got {self.restriction!r}")
    if self.batch_sizes is not None:
      sizes = tuple(self.batch_sizes)
      if len(sizes) != self.levels:
        raise HierarchyError(
            f"batch_sizes has {len(sizes)} entries but the hierarchy has "
            f"{self.levels} levels")
      object.__setattr__(self, "batch_sizes", sizes)
    else:
      if not isinstance(self.base_batch, int) or self.base_batch < 1:
        raise HierarchyError(
            f"base_batch must be a positive integer, got {self.base_batch!r}")
      if not isinstance(self.batch_growth, int) or self.batch_growth < 1:
        raise HierarchyError(
            f"batch_growth must be a positive integer, got {self.batch_growth!r}")
      object.__setattr__(
          self, "batch_sizes",
          tuple(self.base_batch * self.batch_growth**j for j in range(self.levels)))
    for j, n in enumerate(self.batch_sizes):
      if not isinstance(n, int) or n < 1:
        raise HierarchyError(
            f"batch size of level {j} must be a positive integer, got {n!r}")
    coarsest = self.size // factor
    if coarsest < MIN_RECOMMENDED_SIDE:
      warnings.warn(
          f"the coarsest mesh is {coarsest}x{coarsest} pixels; the MGE paper "
          f"recommends at least {MIN_RECOMMENDED_SIDE}x{MIN_RECOMMENDED_SIDE} "
          "so coarse gradients still represent the fine ones",
          CoarseMeshWarning, stacklevel=3)

  @property
  def sizes(self) -> tuple[int, ...]:
    """Image side on each level, finest first."""
    return tuple(self.size // 2**j for j in range(self.levels))

  @property
  def total_batch(self) -> int:
    """Samples one MGE step draws over all levels (single-scale 'same samples')."""
    return sum(self.batch_sizes)

  def cost(self, level: int) -> float:
    """#WU of one model application to one image on ``level`` (``4^-level``).

    Cropping shrinks the image exactly as coarsening does, so the cost of a
    level depends only on its pixel count.
    """
    self._check_level(level)
    return 0.25**level

  def check_schedule(self, iterations: Sequence[int], name: str = "iterations"):
    """Checks a per-stage schedule: one positive integer per level."""
    iterations = tuple(iterations)
    if len(iterations) != self.levels:
      raise HierarchyError(
          f"{name} has {len(iterations)} entries but the hierarchy has "
          f"{self.levels} levels (one per Full-Multiscale stage, coarsest first)")
    for i, n in enumerate(iterations):
      if not isinstance(n, int) or n < 1:
        raise HierarchyError(f"{name}[{i}] must be a positive integer, got {n!r}")
    return iterations

  def _check_level(self, level: int):
    if not 0 <= level < self.levels:
      raise HierarchyError(f"level {level} outside 0..{self.levels - 1}")

  # ---------------------------------------------------------------- transport
  def restrict(self, batch: Any, steps: int, key: jax.Array | None = None,
               start_level: int = 0) -> Any:
    """Carries a batch ``steps`` levels coarser, starting at ``start_level``.

    Every array leaf of rank 4 ``(B, H, W, C)`` is treated as an image and
    restricted; other leaves (e.g. a per-sample noise level ``t`` of shape
    ``(B,)``) pass through unchanged, because they describe the sample, not
    its mesh. Integer and boolean images (label maps, masks) are coarsened
    by ``"nearest"`` whatever the hierarchy's restriction: an average of
    labels is not a label.

    Args:
      batch: pytree of arrays with a leading batch axis.
      steps: number of halvings, ``>= 0``.
      key: PRNG key, needed only when cropping (random window per sample; the
        same window for every image leaf of a sample, so inputs and targets
        stay aligned).
      start_level: the level ``batch`` is on; decides, for
        ``"coarsen+crop"``, which of the two operations each step uses.

    Returns:
      The batch on level ``start_level + steps``.
    """
    if steps < 0:
      raise HierarchyError(f"steps must be >= 0, got {steps}")
    if start_level + steps >= self.levels:
      raise HierarchyError(
          f"cannot restrict from level {start_level} by {steps} steps in a "
          f"{self.levels}-level hierarchy")
    for s in range(steps):
      level = start_level + s
      op = self._operation(level)
      if op == "coarsen":
        batch = jax.tree.map(
            lambda x: coarsen(x, self.restriction if _is_real(x) else "nearest")
            if _is_image(x) else x, batch)
      else:
        if key is None:
          raise HierarchyError(
              f"subsample={self.subsample!r} crops and needs a PRNG key")
        key, sub = jax.random.split(key)
        batch = random_half_crop(batch, sub)
    return batch

  def white_noise_scale(self, steps: int, start_level: int = 0) -> float:
    """Standard deviation of unit white noise carried ``steps`` levels coarser.

    :meth:`restrict` is linear, and every operation maps independent
    ``N(0, 1)`` pixels to independent Gaussian pixels: a 2x2 block mean (the
    ``"average"`` restriction, and ``"bilinear"``, which for a factor 2
    averages the same blocks) halves the standard deviation; keeping one
    pixel per block (``"nearest"``) or cropping keeps it. So
    ``restrict(z, steps)`` with ``z ~ N(0, I)`` is equal in law to
    ``white_noise_scale(steps) * N(0, I)`` on the coarse mesh, which lets a
    sampler draw the noise there directly (:mod:`mgtrain.sampling`).

    Example:
      >>> Hierarchy(levels=4, size=64, base_batch=16).white_noise_scale(3)
      0.125
    """
    if steps < 0 or start_level + steps >= self.levels:
      raise HierarchyError(
          f"cannot restrict from level {start_level} by {steps} steps in a "
          f"{self.levels}-level hierarchy")
    scale = 1.0
    for level in range(start_level, start_level + steps):
      if self._operation(level) == "coarsen" and self.restriction != "nearest":
        scale *= 0.5
    return scale

  def _operation(self, level: int) -> str:
    """The operation carrying level ``level`` to ``level + 1``."""
    if self.subsample == "coarsen":
      return "coarsen"
    if self.subsample == "crop":
      return "crop"
    return "crop" if level % 2 == 0 else "coarsen"


def _is_image(x) -> bool:
  return hasattr(x, "ndim") and x.ndim == 4


def _is_real(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.inexact)


def coarsen(x: jax.Array, restriction: str = "average") -> jax.Array:
  """Restricts NHWC images to a mesh twice as coarse.

  Args:
    x: ``(B, H, W, C)`` with even ``H`` and ``W``.
    restriction: ``"average"`` (2x2 block mean, preserves the image mean),
      ``"bilinear"`` or ``"nearest"``. Integer and boolean images take
      ``"nearest"`` only (:meth:`Hierarchy.restrict` picks it for them).

  Returns:
    ``(B, H/2, W/2, C)``, of ``x``'s dtype.

  Raises:
    HierarchyError: for an odd mesh, an unknown restriction, or an integer
      or boolean image with a restriction other than ``"nearest"``.

  Example:
    >>> import jax.numpy as jnp
    >>> coarsen(jnp.arange(16.).reshape(1, 4, 4, 1))[0, :, :, 0]
    Array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
  """
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise HierarchyError(f"cannot coarsen an odd mesh {h}x{w}")
  if restriction in ("average", "bilinear") and not _is_real(x):
    raise HierarchyError(
        f"restriction {restriction!r} would turn {x.dtype} labels into fractions; "
        "use 'nearest' for integer and boolean images")
  if restriction == "average":
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  if restriction == "nearest":
    return x[:, ::2, ::2, :]
  if restriction == "bilinear":
    return jax.image.resize(x, (b, h // 2, w // 2, c), "bilinear", antialias=False)
  raise HierarchyError(f"restriction must be one of {RESTRICTIONS}, got {restriction!r}")


def random_half_crop(batch: Any, key: jax.Array) -> Any:
  """Crops every image leaf of ``batch`` to a random window of half the side.

  One window per sample, shared by all image leaves, so an input and its
  target are cut identically.
  """
  images = [x for x in jax.tree.leaves(batch) if _is_image(x)]
  if not images:
    return batch
  b, h, w, _ = images[0].shape
  if h % 2 or w % 2:
    raise HierarchyError(f"cannot crop an odd mesh {h}x{w} in half")
  ky, kx = jax.random.split(key)
  oy = jax.random.randint(ky, (b,), 0, h // 2 + 1)
  ox = jax.random.randint(kx, (b,), 0, w // 2 + 1)

  def crop(x):
    if not _is_image(x):
      return x
    one = lambda img, y0, x0: jax.lax.dynamic_slice(
        img, (y0, x0, 0), (h // 2, w // 2, img.shape[-1]))
    return jax.vmap(one)(x, oy, ox)

  return jax.tree.map(crop, batch)


def levels_for_stage(levels: int, stage: int) -> tuple[int, ...]:
  """Global levels used by Full-Multiscale stage ``stage`` (0 = coarsest).

  Stage ``s`` trains on mesh ``h * 2^(L-1-s)`` with an ``(s+1)``-level MGE
  estimate (Algorithm 2 with Algorithm 1 inside), i.e. levels
  ``L-1-s, ..., L-1``.

  >>> levels_for_stage(4, 0), levels_for_stage(4, 3)
  ((3,), (0, 1, 2, 3))
  """
  if not 0 <= stage < levels:
    raise HierarchyError(f"stage {stage} outside 0..{levels - 1}")
  return tuple(range(levels - 1 - stage, levels))



__all__ = [
    "Hierarchy", "HierarchyError", "CoarseMeshWarning", "coarsen",
    "random_half_crop", "levels_for_stage", "SUBSAMPLE_MODES", "RESTRICTIONS",
]
