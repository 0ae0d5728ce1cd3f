"""Level parallelism: MGE's terms on different device groups, concurrently.

The terms of Eq. 6 are independent until they are summed: term ``k`` needs
only the parameters and its own fresh batch. The MGE paper (Section 2.1) says
they "can, in principle, be executed in parallel" and leaves "the
engineering of parallel execution" for future work. Here every term
gets its own group of devices and its own jitted program; JAX dispatches
programs asynchronously, so the groups compute their terms at the same time.
The per-level gradients are then moved to group 0, where the
:func:`mgtrain.transform.multiscale` update runs, and the new parameters are
sent back to every group for the next step. Within a group the term's batch
is split over the group's devices (data parallelism, as in
:mod:`mgtrain.parallel`).

Groups are sized by the cost of their terms (:func:`device_groups`): with
batches ``N_k`` on meshes ``2^k h``, term ``k`` costs
``N_k (4^-k + 4^-(k+1))`` #WU (``N_k 4^-k`` for the coarsest), so with the
reference doubling batches the finest term is the most expensive and gets the
most devices.

The update equals the single-device step of
:func:`mgtrain.full_multiscale.make_stage_step`: the same keys, the same
samples, the same terms, up to the order of floating-point sums (tested on 8
fake CPU devices, ``tests/test_parallel.py``).

Example: how 8 devices are split for the reference 4-level step (terms of
20, 10, 5 and 2 #WU)::

  >>> from mgtrain import full_multiscale as fm
  >>> from mgtrain.hierarchy import Hierarchy
  >>> stage = fm.multiscale_schedule(Hierarchy(levels=4, size=64, base_batch=16), 1)[0]
  >>> [float(c) for c in term_costs(stage)]
  [20.0, 10.0, 5.0, 2.0]
  >>> group_sizes(stage, 8)
  [4, 2, 1, 1]

Use::

  groups = device_groups(stage, jax.devices())
  step = make_level_parallel_step(stage, hierarchy, loss_fn, sample_fn, tx, groups)
  state, data = step.place(state, data)
  for _ in range(iterations):
    state, metrics = step(state, data)
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType

from mgtrain import parallel
from mgtrain.full_multiscale import Stage, TrainState, apply_gradient, step_keys
from mgtrain.hierarchy import Hierarchy, HierarchyError
from mgtrain.mge import term_value_and_grad, term_views
from mgtrain.sampling import draw
from mgtrain.workunits import level_cost


def term_costs(stage: Stage) -> list[Fraction]:
  """#WU of each term of one step of ``stage`` (finest first)."""
  costs = []
  for i, (level, n) in enumerate(zip(stage.levels, stage.batch_sizes)):
    last = i == len(stage.levels) - 1
    costs.append(n * (level_cost(level) + (0 if last else level_cost(level + 1))))
  return costs


def group_sizes(stage: Stage, num_devices: int) -> list[int]:
  """How many devices each term gets, sized by the terms' costs.

  Every term starts with one device; then, while devices are left, the group
  with the highest cost per device doubles, provided its batch still splits
  evenly. Devices that no group can take stay unused.

  Raises:
    HierarchyError: fewer devices than terms.
  """
  levels = len(stage.levels)
  if num_devices < levels:
    raise HierarchyError(
        f"level parallelism needs at least one device per level: {num_devices} devices "
        f"for {levels} levels")
  costs = term_costs(stage)
  sizes = [1] * levels
  left = num_devices - levels
  while True:
    candidates = [k for k in range(levels)
                  if sizes[k] <= left and stage.batch_sizes[k] % (2 * sizes[k]) == 0]
    if not candidates:
      return sizes
    k = max(candidates, key=lambda j: (costs[j] / sizes[j], -j))
    left -= sizes[k]
    sizes[k] *= 2


def device_groups(stage: Stage, devices: Sequence[jax.Device] | None = None
                  ) -> list[tuple[jax.Device, ...]]:
  """Consecutive groups of ``devices`` (default: all) of :func:`group_sizes`."""
  devices = list(jax.devices() if devices is None else devices)
  groups, start = [], 0
  for size in group_sizes(stage, len(devices)):
    groups.append(tuple(devices[start:start + size]))
    start += size
  return groups


class LevelParallelStep:
  """One MGE step with its terms on separate device groups (see the module doc).

  Call :meth:`place` once to put the state on group 0 and a copy of ``data``
  on every group; then ``step(state, data) -> (state, metrics)`` like the
  step of :func:`mgtrain.full_multiscale.make_stage_step`.

  Attributes:
    meshes: one ``('data',)`` mesh per term's device group.
  """

  def __init__(self, stage: Stage, hierarchy: Hierarchy, loss_fn: Callable,
               sample_fn: Callable, tx: optax.GradientTransformation,
               groups: Sequence[Sequence[jax.Device]],
               max_pixels_per_chunk: int | None = None):
    if len(groups) != len(stage.levels):
      raise HierarchyError(
          f"need one device group per level: {len(groups)} groups for {len(stage.levels)} "
          "levels")
    self.stage = stage
    self.meshes = [jax.make_mesh((len(g),), (parallel.DATA_AXIS,),
                                 axis_types=(AxisType.Auto,), devices=list(g))
                   for g in groups]
    for n, mesh in zip(stage.batch_sizes, self.meshes):
      parallel.check_batches((n,), mesh)
    crops = hierarchy.subsample != "coarsen"
    levels = len(stage.levels)

    def keys(rng, step):
      k_data, k_crop = step_keys(rng, step, levels)
      return k_data, jax.random.split(k_crop, levels)

    self._keys = jax.jit(keys)
    self._terms = []
    for i, (level, n, mesh) in enumerate(zip(stage.levels, stage.batch_sizes, self.meshes)):
      sample = parallel.shard_batches(sample_fn, mesh)
      last = i == levels - 1

      def term(params, data, key, crop_key, level=level, n=n, sample=sample, last=last):
        batch, arrives = draw(sample, data, key, n, hierarchy, level)
        views = term_views(batch, hierarchy, level, last, crop_key if crops else None, arrives)
        return term_value_and_grad(loss_fn, params, views, max_pixels_per_chunk)

      self._terms.append(jax.jit(term))

    def update(state: TrainState, values, grads):
      # The multiscale transform stacks the list of level terms itself.
      return apply_gradient(state, stage, tx, list(grads), jnp.stack(values))

    self._update = jax.jit(update, donate_argnums=0)

  def place(self, state: TrainState, data):
    """``(state on group 0, [data on group k for every k])``."""
    return (parallel.replicate(state, self.meshes[0]),
            [parallel.replicate(data, mesh) for mesh in self.meshes])

  def __call__(self, state: TrainState, data: Sequence):
    keys, crop_keys = self._keys(state.rng, state.step)
    values, grads = [], []
    # Every call below only enqueues work, so the groups run concurrently.
    for k, (term, mesh) in enumerate(zip(self._terms, self.meshes)):
      params, key, crop_key = parallel.replicate((state.params, keys[k], crop_keys[k]), mesh)
      value, grad = term(params, data[k], key, crop_key)
      values.append(value)
      grads.append(grad)
    home = self.meshes[0]
    values, grads = parallel.replicate((values, grads), home)
    return self._update(state, values, grads)


def make_level_parallel_step(stage: Stage, hierarchy: Hierarchy, loss_fn: Callable,
                             sample_fn: Callable, tx: optax.GradientTransformation,
                             groups: Sequence[Sequence[jax.Device]] | None = None,
                             max_pixels_per_chunk: int | None = None) -> LevelParallelStep:
  """A :class:`LevelParallelStep`; ``groups`` defaults to :func:`device_groups`."""
  if groups is None:
    groups = device_groups(stage)
  return LevelParallelStep(stage, hierarchy, loss_fn, sample_fn, tx, groups,
                           max_pixels_per_chunk)


__all__ = ["term_costs", "group_sizes", "device_groups", "LevelParallelStep", "make_level_parallel_step"]
