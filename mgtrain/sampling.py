"""Drawing each MGE term's samples on the mesh that term needs.

A train step draws one fresh batch per term of Eq. 6 with
``sample_fn(data, key, n)``, on the finest mesh, and
:func:`mgtrain.mge.level_views` restricts it to the term's meshes. Term ``k``
only ever sees its samples on meshes ``k`` and ``k + 1``, so in a 4-level
step (batches 16..128) three quarters of the fine-mesh sampling work is
thrown away: the step draws 240 fine images' noise and patches for 2.31
fine images' worth of model work. On the 2-core CPU that sampling was
about 100 ms of a 6.3 s ResNet MGE step at 128^2 (its threefry noise alone),
against 13 ms in the single-scale batch-16 step.

A sample function marked with :func:`coarse_sampler` takes two more keyword
arguments, ``hierarchy`` and ``level``, and returns a batch on mesh
``level`` that is *equal in law* to ``hierarchy.restrict(sample_fn(data, key,
n), level)``, doing its work there. For the denoising task that holds
exactly: restriction is linear, so ``R(t y + (1 - t) z) = t R(y) + (1 - t)
R(z)``, and ``R(z)`` of white noise is white noise of standard deviation
:meth:`mgtrain.hierarchy.Hierarchy.white_noise_scale`. :func:`draw` uses it
when the hierarchy only coarsens; a cropping hierarchy's windows depend on
where the fine patch was cut, so those keep drawing on the finest mesh. An
unmarked sample function is always called as ``sample_fn(data, key, n)``.

The batches differ from the fine-mesh draws value by value (the noise is
drawn on another shape), not in law, so training statistics are unchanged;
single-scale steps on the finest mesh draw exactly what they drew before.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from mgtrain.hierarchy import Hierarchy
  >>> @coarse_sampler
  ... def sample(data, key, n, *, hierarchy=None, level=0):
  ...   z = jax.random.normal(key, (n, 16 >> level, 16 >> level, 1))
  ...   return {"u": z * (hierarchy.white_noise_scale(level) if level else 1.0)}
  >>> h = Hierarchy(levels=3, size=16, base_batch=2)
  >>> batch, on_level = draw(sample, None, jax.random.key(0), 4, h, 2)
  >>> batch["u"].shape, on_level
  ((4, 4, 4, 1), 2)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from mgtrain.hierarchy import Hierarchy, HierarchyError

_MARK = "draws_on_coarse_meshes"


def coarse_sampler(sample_fn: Callable) -> Callable:
  """Marks ``sample_fn(data, key, n, *, hierarchy, level)`` as drawing on mesh ``level``.

  The function must return, for any coarsening hierarchy, a batch equal in
  law to ``hierarchy.restrict(sample_fn(data, key, n), level)``, and with
  ``level=0`` exactly its finest-mesh batch. Returns ``sample_fn`` itself.
  """
  setattr(sample_fn, _MARK, True)
  return sample_fn


def draws_on_coarse_meshes(sample_fn: Callable) -> bool:
  """Whether ``sample_fn`` was marked with :func:`coarse_sampler`."""
  return bool(getattr(sample_fn, _MARK, False))


def on_finest_mesh(sample_fn: Callable) -> Callable:
  """``sample_fn`` as a plain sampler: every batch drawn on the finest mesh.

  What every step did before :func:`coarse_sampler` existed; for A/B timing
  (``python -m experiments.levers --sampling fine``) and for comparing runs
  with old ones value for value.
  """
  def finest(data, key, n):
    return sample_fn(data, key, n)
  return finest


def draw(sample_fn: Callable, data: Any, key: jax.Array, n: int, hierarchy: Hierarchy,
         level: int) -> tuple[Any, int]:
  """``n`` fresh samples for a term whose finest mesh is ``level``.

  Returns ``(batch, batch_level)``: drawn on ``level`` when ``sample_fn`` is a
  :func:`coarse_sampler` and ``hierarchy`` only coarsens, otherwise on the
  finest mesh (``batch_level`` 0), for :func:`mgtrain.mge.level_views` to
  restrict.
  """
  if level and hierarchy.subsample == "coarsen" and draws_on_coarse_meshes(sample_fn):
    batch, batch_level = sample_fn(data, key, n, hierarchy=hierarchy, level=level), level
  else:
    batch, batch_level = sample_fn(data, key, n), 0
  _check_batch_size(batch, n, sample_fn)
  return batch, batch_level


def _check_batch_size(batch: Any, n: int, sample_fn: Callable) -> None:
  """Raises :class:`HierarchyError` unless every non-scalar leaf of ``batch``
  has ``n`` samples on its leading axis. A sampler that ignored ``n`` would
  otherwise train on other batch sizes than the step counts #WU for."""
  for leaf in jax.tree.leaves(batch):
    if jnp.ndim(leaf) and jnp.shape(leaf)[0] != n:
      name = getattr(sample_fn, "__name__", repr(sample_fn))
      raise HierarchyError(
          f"sample_fn {name} was asked for {n} samples but returned a leaf of shape "
          f"{jnp.shape(leaf)}; every array in a batch needs the batch size on axis 0")


def draw_levels(sample_fn: Callable, data: Any, keys, batch_sizes, hierarchy: Hierarchy,
                levels) -> tuple[list, tuple[int, ...]]:
  """:func:`draw` for every term: ``(batches, batch_levels)``, one per level.

  ``keys``, ``batch_sizes`` and ``levels`` give each term's sampling key,
  batch size and finest mesh (a stage's ``levels``).
  """
  drawn = [draw(sample_fn, data, k, n, hierarchy, level)
           for k, n, level in zip(keys, batch_sizes, levels)]
  return [batch for batch, _ in drawn], tuple(level for _, level in drawn)


__all__ = ["coarse_sampler", "draws_on_coarse_meshes", "on_finest_mesh", "draw", "draw_levels"]
