"""An Optax transform that combines MGE's per-level gradient terms.

:func:`multiscale` wraps any inner optax optimizer. Its ``update`` takes the
gradient terms of Eq. 6 of the MGE paper, one per level, either as a pytree
whose leaves have a leading level axis (what
:func:`mgtrain.mge.mge_value_and_grad` returns) or as a list of ``L``
params-shaped pytrees, sums them into the multiscale gradient estimate::

  g = sum_k g_k,   g_k = 1/N_k sum_i (g_i^{h_k} - g_i^{h_{k+1}}),  g_{L-1} = 1/N_{L-1} sum_i g_i^{h_{L-1}}

and hands ``g`` to the inner optimizer. Like optax's wrappers it keeps the
inner state in ``inner_state``.

Its state also keeps, per level ``k``, exponential moving averages (decay
``beta``, bias-corrected) of each term and of its squared norm, from which

* ``sq_norm[k]  ~ E ||g_k||^2`` and
* ``variance[k] ~ E ||g_k - E g_k||^2 = E||g_k||^2 - ||E g_k||^2``

are read. Multilevel Monte Carlo allocates batches by these numbers
(``N_k ~ sqrt(V_k / C_k)``, Giles 2015); they are what the planned adaptive
batch sizes consume. The moving averages follow the iterates, so they mix
sampling variance with the drift of the parameters; with a slowly moving
model the drift is small.

Three lines put MGE into another Flax/optax project::

  tx = mgtrain.transform.multiscale(optax.adam(1e-3), num_levels=4)
  loss, level_grads, _ = mgtrain.mge.mge_value_and_grad(loss_fn, params, batches, hierarchy)
  updates, opt_state = tx.update(level_grads, opt_state, params)

Example:
  >>> import jax.numpy as jnp, optax
  >>> tx = multiscale(optax.sgd(0.1), num_levels=2)
  >>> params = {"w": jnp.ones(3)}
  >>> state = tx.init(params)
  >>> level_grads = {"w": jnp.stack([jnp.ones(3), 2 * jnp.ones(3)])}
  >>> updates, state = tx.update(level_grads, state, params)
  >>> updates["w"]
  Array([-0.3, -0.3, -0.3], dtype=float32)

References:
  Giles, *Multilevel Monte Carlo methods*, Acta Numerica 24 (2015).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax


class MultiscaleState(NamedTuple):
  """State of :func:`multiscale`.

  Attributes:
    count: number of updates so far (int32 scalar).
    term_mean: EMA of each level's gradient term, params-shaped leaves with a
      leading level axis ``(L, ...)`` (not bias-corrected).
    term_sq_norm_ema: ``(L,)`` EMA of ``||g_k||^2`` (not bias-corrected).
    sq_norm: ``(L,)`` bias-corrected estimate of ``E ||g_k||^2``.
    variance: ``(L,)`` bias-corrected estimate of ``E ||g_k - E g_k||^2``.
    last_sq_norm: ``(L,)`` ``||g_k||^2`` of the latest update.
    inner_state: the wrapped optimizer's state.
  """

  count: jax.Array
  term_mean: Any
  term_sq_norm_ema: jax.Array
  sq_norm: jax.Array
  variance: jax.Array
  last_sq_norm: jax.Array
  inner_state: Any


def stack_levels(level_updates: Any | Sequence[Any], num_levels: int):
  """Returns the level terms as one pytree with a leading level axis.

  Accepts a list/tuple of ``num_levels`` params-shaped pytrees or a pytree
  already stacked on axis 0; checks the level count either way.
  """
  if isinstance(level_updates, (list, tuple)) and len(level_updates) and not (
      hasattr(level_updates, "_fields")):
    if len(level_updates) != num_levels:
      raise ValueError(
          f"expected {num_levels} level terms, got a list of {len(level_updates)}")
    return jax.tree.map(lambda *g: jnp.stack(g), *level_updates)
  for leaf in jax.tree.leaves(level_updates):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != num_levels:
      raise ValueError(
          f"expected leaves with a leading level axis of size {num_levels}, got "
          f"a leaf of shape {jnp.shape(leaf)}; pass a list of per-level pytrees "
          "or stack them on axis 0")
  return level_updates


def same_shapes(a, b) -> bool:
  """Whether pytrees ``a`` and ``b`` have the same structure and leaf shapes
  (static shapes, so this costs nothing inside ``jit``).

  >>> same_shapes({"w": jnp.ones(3)}, {"w": jnp.zeros(3)}), same_shapes({"w": jnp.ones(3)}, {"w": jnp.ones(2)})
  (True, False)
  """
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      jnp.shape(x) == jnp.shape(y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _check_shapes(updates, reference, what: str, hint: str) -> None:
  """Raises ``ValueError`` unless :func:`same_shapes` ``(updates, reference)``."""
  if not same_shapes(updates, reference):
    raise ValueError(f"{what}: expected leaves of shapes {jax.tree.map(jnp.shape, reference)}, "
                     f"got {jax.tree.map(jnp.shape, updates)}; {hint}")


def _sq_norm_per_level(stacked) -> jax.Array:
  leaves = jax.tree.leaves(stacked)
  return sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1).astype(jnp.float32)), axis=1)
             for x in leaves)


def multiscale(inner: optax.GradientTransformation, num_levels: int,
               beta: float = 0.99, level_terms: bool = True
               ) -> optax.GradientTransformationExtraArgs:
  """Sums per-level MGE gradient terms and applies ``inner`` to the sum.

  Args:
    inner: any optax transformation (e.g. ``optax.adam(5e-4)``).
    num_levels: number of levels ``L`` whose terms each update receives.
    beta: decay of the running per-level statistics, in ``[0, 1)``.
    level_terms: ``True``: ``update`` takes the ``L`` terms and tracks their
      statistics. ``False``: it takes the already summed gradient (what
      :func:`mgtrain.mge.mge_value_and_grad_by_mesh` returns), passes it to
      ``inner`` and tracks nothing per level: ``term_mean`` is ``None`` and
      the ``(L,)`` statistics stay NaN. The state has the same structure
      either way, so code that reads ``inner_state`` works with both.

  Returns:
    A ``GradientTransformationExtraArgs``. ``init(params)`` takes a
    params-shaped pytree (no level axis); ``update(level_updates, state,
    params=None, **extra_args)`` takes the level terms and forwards
    ``params`` and the extra arguments to ``inner``.
  """
  if not isinstance(num_levels, int) or num_levels < 1:
    raise ValueError(f"num_levels must be a positive integer, got {num_levels!r}")
  if not 0.0 <= beta < 1.0:
    raise ValueError(f"beta must be in [0, 1), got {beta}")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if not level_terms:
      # Separate arrays, not one shared: a jitted step that donates its state
      # may not donate the same buffer twice.
      nan = [jnp.full((num_levels,), jnp.nan, jnp.float32) for _ in range(4)]
      return MultiscaleState(
          count=jnp.zeros([], jnp.int32), term_mean=None, term_sq_norm_ema=nan[0],
          sq_norm=nan[1], variance=nan[2], last_sq_norm=nan[3],
          inner_state=inner.init(params))
    zeros = jax.tree.map(
        lambda p: jnp.zeros((num_levels,) + jnp.shape(p), jnp.result_type(p)), params)
    stat = jnp.zeros((num_levels,), jnp.float32)
    return MultiscaleState(
        count=jnp.zeros([], jnp.int32), term_mean=zeros, term_sq_norm_ema=stat,
        sq_norm=stat, variance=stat, last_sq_norm=stat,
        inner_state=inner.init(params))

  def update_fn(level_updates, state, params=None, **extra_args):
    # Without these checks a gradient of the other kind (summed where level
    # terms are expected, or the reverse) could broadcast through the
    # arithmetic and reach the parameters with the wrong shape, silently.
    if not level_terms:
      if params is not None:
        _check_shapes(level_updates, params, "multiscale(level_terms=False) takes the summed "
                      "gradient, params-shaped", "for per-level terms use level_terms=True")
      updates, inner_state = inner.update(level_updates, state.inner_state, params,
                                          **extra_args)
      return updates, state._replace(count=state.count + 1, inner_state=inner_state)
    stacked = stack_levels(level_updates, num_levels)
    _check_shapes(stacked, state.term_mean, f"multiscale takes {num_levels} level terms, "
                  "params-shaped leaves with a leading level axis",
                  "for an already summed gradient use level_terms=False")
    combined = jax.tree.map(lambda g: jnp.sum(g, axis=0), stacked)

    count = state.count + 1
    sq = _sq_norm_per_level(stacked)
    term_mean = jax.tree.map(
        lambda m, g: beta * m + (1 - beta) * g.astype(m.dtype), state.term_mean, stacked)
    sq_ema = beta * state.term_sq_norm_ema + (1 - beta) * sq
    correction = 1 - beta ** count.astype(jnp.float32)
    sq_norm = sq_ema / correction
    mean_sq = _sq_norm_per_level(jax.tree.map(lambda m: m / correction, term_mean))
    variance = jnp.maximum(sq_norm - mean_sq, 0.0)

    updates, inner_state = inner.update(combined, state.inner_state, params, **extra_args)
    return updates, MultiscaleState(
        count=count, term_mean=term_mean, term_sq_norm_ema=sq_ema, sq_norm=sq_norm,
        variance=variance, last_sq_norm=sq, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = ["multiscale", "MultiscaleState", "stack_levels", "same_shapes"]
