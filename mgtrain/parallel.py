"""Data parallelism for MGE steps over a ``jax.make_mesh`` device mesh.

One jitted step, batch sharded, parameters replicated: every level's fresh
batch is constrained to be split along the mesh's ``data`` axis, the
parameters, optimizer state and data pool are replicated, and XLA's SPMD
partitioner inserts the gradient all-reduce. The update equals the
one-device update up to the order of floating-point sums (tested on 8 fake
CPU devices, ``tests/test_parallel.py``).

Every level's batch size must be divisible by the number of devices on the
``data`` axis (each device gets the same share of every level).

Example (one device, so nothing is actually split)::

  >>> import jax
  >>> mesh = data_mesh()
  >>> mesh.axis_names
  ('data',)

Use::

  mesh = data_mesh()                                   # all local devices
  sample = shard_batches(sample_fn, mesh)              # batches split on 'data'
  step = jax.jit(fm.make_stage_step(stage, hierarchy, loss_fn, sample, tx))
  state, data = replicate((state, data), mesh)
  state, metrics = step(state, data)

Multi-host: call :func:`initialize_distributed` (``jax.distributed.initialize``)
first; ``jax.devices()`` then lists every host's devices and the same code
runs on each host.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mgtrain.hierarchy import HierarchyError
from mgtrain.sampling import coarse_sampler, draws_on_coarse_meshes

DATA_AXIS = "data"


def data_mesh(num_devices: int | None = None, axis: str = DATA_AXIS) -> jax.sharding.Mesh:
  """A 1D mesh over the first ``num_devices`` devices (default: all of them)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
  # Auto axes: shardings are propagated by the partitioner from the
  # constraints below, as with pjit.
  return jax.make_mesh((n,), (axis,), axis_types=(AxisType.Auto,), devices=devices[:n])


def check_batches(batch_sizes: Sequence[int], mesh: jax.sharding.Mesh,
                  axis: str = DATA_AXIS) -> None:
  """Raises :class:`HierarchyError` unless every batch splits evenly over ``axis``."""
  n = mesh.shape[axis]
  bad = [b for b in batch_sizes if b % n]
  if bad:
    raise HierarchyError(
        f"batch sizes {tuple(batch_sizes)} must all be divisible by the {n} devices of "
        f"the '{axis}' axis; {bad} are not (choose base_batch as a multiple of {n})")


def shard_batches(sample_fn: Callable, mesh: jax.sharding.Mesh,
                  axis: str = DATA_AXIS) -> Callable:
  """Wraps ``sample_fn(data, key, n)`` so each batch is split along ``axis``.

  The leading (sample) axis of every leaf is sharded; the sampling itself
  runs inside the jitted step, so every device draws only its share. A
  :func:`mgtrain.sampling.coarse_sampler` stays one: its ``hierarchy`` and
  ``level`` keywords pass through.
  """
  devices = mesh.shape[axis]

  def sharded(data, key, n, **on_level):
    if n % devices:
      raise HierarchyError(f"a batch of {n} does not split over {devices} devices")
    batch = sample_fn(data, key, n, **on_level)

    def constrain(x):
      spec = PartitionSpec(axis, *([None] * (x.ndim - 1)))
      return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(constrain, batch)

  return coarse_sampler(sharded) if draws_on_coarse_meshes(sample_fn) else sharded


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places every leaf of ``tree`` on all devices of ``mesh`` (replicated).

  With several processes (multi-host), each process must pass the same
  values (the CLIs derive everything from the seed); every process then
  fills its own devices from its local copy.
  """
  sharding = NamedSharding(mesh, PartitionSpec())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def place(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(place, tree)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> dict:
  """Joins a multi-host run: ``jax.distributed.initialize`` with the given settings.

  Call it once per process, before anything touches a device. Without
  arguments JAX detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU);
  otherwise pass the coordinator's ``host:port``, the process count and this
  process's index (0 on the coordinator). Afterwards ``jax.devices()`` lists
  every host's devices, so :func:`data_mesh` spans them all.

  Returns:
    ``{"process_index", "process_count", "local_devices", "global_devices"}``.
  """
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(), "global_devices": jax.device_count()}
