"""Multiscale Gradient Estimation (MGE), Algorithm 1 of the MGE paper.

The fine-mesh expected gradient is a telescoping sum over meshes
``h = h_1 < ... < h_L`` (Eq. 5)::

  E[g^{h_1}] = E[g^{h_L}] + sum_{j=2}^{L} E[g^{h_{j-1}} - g^{h_j}]

and MGE estimates each term with its *own* batch (Eq. 6)::

  E[g^{h_1}] ~ 1/N_L sum_i g_i^{h_L}
             + sum_{j=2}^{L} 1/N_{j-1} sum_i (g_i^{h_{j-1}} - g_i^{h_j})

where a correction term evaluates the *same* samples on two adjacent meshes.
In this module's 0-based indexing, level ``k`` has mesh ``2^k h`` and batch
``N_k``; term ``k < L-1`` is ``mean_i [l(R^k b_i) - l(R^{k+1} b_i)]`` and the
last term is ``mean_i l(R^{L-1} b_i)``, with ``R`` the hierarchy's
restriction.

Everything here is a pure function of ``(params, batches, key)``: wrap it in
one :func:`jax.jit` and all levels become one XLA program. Shapes differ per
level, so the levels are unrolled in Python at trace time; nothing is
recompiled after the first call as long as the batch shapes stay fixed.

The per-sample loss is any ``loss_fn(params, batch) -> (B,)`` (a scalar is
taken as the batch mean already). Normalise it per pixel (a mean, not a sum,
over the mesh): only then do losses on different meshes approximate the same
continuous functional, which the telescoping sum needs.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from mgtrain.hierarchy import Hierarchy
  >>> h = Hierarchy(levels=3, size=16, base_batch=2)
  >>> def loss_fn(w, batch):  # a toy per-pixel loss
  ...   return jnp.mean((w * batch["x"] - batch["y"]) ** 2, axis=(1, 2, 3))
  >>> keys = jax.random.split(jax.random.key(0), 3)
  >>> batches = [{"x": jax.random.normal(k, (n, 16, 16, 1)),
  ...             "y": jnp.zeros((n, 16, 16, 1))}
  ...            for k, n in zip(keys, h.batch_sizes)]
  >>> loss, level_grads, terms = mge_value_and_grad(loss_fn, 1.0, batches, h)
  >>> level_grads.shape, terms.shape
  ((3,), (3,))
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mgtrain.hierarchy import Hierarchy, HierarchyError

LossFn = Callable[[Any, Any], jax.Array]


def _mean_loss(loss_fn: LossFn, params, batch) -> jax.Array:
  value = loss_fn(params, batch)
  return jnp.mean(value) if jnp.ndim(value) else value


def _check_levels(hierarchy: Hierarchy, levels: Sequence[int] | None) -> tuple[int, ...]:
  levels = tuple(range(hierarchy.levels)) if levels is None else tuple(levels)
  if not levels:
    raise HierarchyError("MGE needs at least one level")
  if any(b - a != 1 for a, b in zip(levels, levels[1:])):
    raise HierarchyError(f"MGE levels must be consecutive, finest first; got {levels}")
  if levels[0] < 0 or levels[-1] >= hierarchy.levels:
    raise HierarchyError(
        f"levels {levels} outside the hierarchy's 0..{hierarchy.levels - 1}")
  return levels


def level_terms(loss_fn: LossFn, batches: Sequence[Any],
                hierarchy: Hierarchy, levels: Sequence[int] | None = None,
                key: jax.Array | None = None, input_level: int = 0
                ) -> list[Callable[[Any], jax.Array]]:
  """The terms of Eq. 6 as functions of ``params``, finest first.

  Args:
    loss_fn: per-sample loss ``loss_fn(params, batch) -> (B,)``.
    batches: one batch per level in ``levels`` (fresh samples per level, as
      in Algorithm 1), each a pytree whose rank-4 leaves are NHWC images on
      mesh ``input_level`` (the data's own mesh, usually 0).
    hierarchy: the :class:`~mgtrain.hierarchy.Hierarchy`.
    levels: consecutive global levels, finest first (default: all). The last
      one is the coarsest term; Full-Multiscale stage ``s`` uses
      ``L-1-s .. L-1`` and single-scale one level.
    key: PRNG key, needed only when the hierarchy crops.
    input_level: mesh level the batches arrive on.

  Returns:
    One function ``term(params) -> scalar`` per level.
  """
  levels = _check_levels(hierarchy, levels)
  if len(batches) != len(levels):
    raise HierarchyError(
        f"MGE needs one batch per level: got {len(batches)} batches for levels {levels}")
  if input_level > levels[0]:
    raise HierarchyError(
        f"batches arrive on level {input_level}, finer than the finest MGE "
        f"level {levels[0]} is required")
  keys = (list(jax.random.split(key, len(levels))) if key is not None
          else [None] * len(levels))
  terms = []
  for i, (level, batch, k) in enumerate(zip(levels, batches, keys)):
    # Views of the same samples on this level and (for corrections) the next.
    fine = hierarchy.restrict(batch, level - input_level, k, start_level=input_level)
    if i == len(levels) - 1:
      terms.append(lambda p, fine=fine: _mean_loss(loss_fn, p, fine))
    else:
      k2 = None if k is None else jax.random.fold_in(k, 1)
      coarse = hierarchy.restrict(fine, 1, k2, start_level=level)
      terms.append(lambda p, fine=fine, coarse=coarse: (
          _mean_loss(loss_fn, p, fine) - _mean_loss(loss_fn, p, coarse)))
  return terms


def mge_value_and_grad(loss_fn: LossFn, params, batches: Sequence[Any],
                       hierarchy: Hierarchy, levels: Sequence[int] | None = None,
                       key: jax.Array | None = None, input_level: int = 0):
  """Telescoping loss, per-level gradient terms and per-level loss terms.

  Computes every term of Eq. 6 and its gradient. The gradient of the sum is
  the sum of the per-term gradients (gradients are linear), so computing them
  separately costs nothing extra and gives the optax transform
  (:func:`mgtrain.transform.multiscale`) the individual terms it tracks.

  Returns:
    ``(loss, level_grads, terms)``: ``loss`` the scalar telescoping estimate
    of the fine-mesh loss, ``level_grads`` a params-shaped pytree with a
    leading level axis of length ``len(levels)`` (finest first), ``terms``
    the ``(len(levels),)`` loss terms.
  """
  fns = level_terms(loss_fn, batches, hierarchy, levels, key, input_level)
  values, grads = [], []
  for fn in fns:
    v, g = jax.value_and_grad(fn)(params)
    values.append(v)
    grads.append(g)
  terms = jnp.stack(values)
  level_grads = jax.tree.map(lambda *g: jnp.stack(g), *grads)
  return jnp.sum(terms), level_grads, terms


def mge_loss(loss_fn: LossFn, params, batches: Sequence[Any], hierarchy: Hierarchy,
             levels: Sequence[int] | None = None, key: jax.Array | None = None,
             input_level: int = 0) -> jax.Array:
  """The scalar telescoping loss (Algorithm 1's ``loss``); ``jax.grad`` of it is MGE."""
  fns = level_terms(loss_fn, batches, hierarchy, levels, key, input_level)
  return sum(fn(params) for fn in fns)


def combine_level_grads(level_grads):
  """Sums a stacked (leading level axis) gradient pytree: Eq. 6's estimate."""
  return jax.tree.map(lambda g: jnp.sum(g, axis=0), level_grads)


__all__ = ["level_terms", "mge_value_and_grad", "mge_loss", "combine_level_grads"]
