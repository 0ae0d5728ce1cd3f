"""Runs in a subprocess with 8 fake CPU devices (see tests/test_parallel.py).

Compares one 3-level MGE Adam step (and one single-scale step) computed on one
device with the same step data-parallel over 8 devices; prints JSON.
"""

import json
import os
import sys

# The caller sets XLA_FLAGS=--xla_force_host_platform_device_count=8 (importing
# this module, e.g. for doctest collection, changes nothing).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from mgtrain import full_multiscale as fm  # noqa: E402
from mgtrain import level_parallel  # noqa: E402
from mgtrain import parallel  # noqa: E402
from mgtrain.hierarchy import Hierarchy  # noqa: E402
from mgtrain.sampling import coarse_sampler  # noqa: E402
from mgtrain.transform import multiscale  # noqa: E402
from tests.conftest import TinyCNN, mse_loss_fn, smooth_images  # noqa: E402


@coarse_sampler
def sample_fn(pool, key, n, *, hierarchy=None, level=0):
  # Draws on a term's finest mesh by restricting the fine batch: the same
  # values either way, so the comparisons stay exact while the sharded and
  # level-parallel steps take the coarse-sampling path.
  idx = jax.random.randint(key, (n,), 0, pool.shape[0])
  x = pool[idx]
  batch = {"x": x, "y": jnp.roll(x, 1, axis=2)}
  return hierarchy.restrict(batch, level) if level else batch


def run(stage, hierarchy, mesh):
  model = TinyCNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  pool = smooth_images(jax.random.key(1), 64, 32)
  tx = multiscale(optax.adam(1e-2), len(stage.levels))
  state = fm.init_state(params, seed=3, opt_state=tx.init(params))
  sample = sample_fn if mesh is None else parallel.shard_batches(sample_fn, mesh)
  step = jax.jit(fm.make_stage_step(stage, hierarchy, mse_loss_fn(model), sample, tx))
  if mesh is not None:
    state, pool = parallel.replicate((state, pool), mesh)
  hlo = step.lower(state, pool).compile().as_text()
  for _ in range(2):
    state, metrics = step(state, pool)
  leaves = jax.tree.leaves(state.params)
  devices = len(leaves[0].sharding.device_set)
  return state, float(metrics["loss"]), devices, "all-reduce" in hlo


def main():
  h = Hierarchy(levels=3, size=32, base_batch=8)
  mesh = parallel.data_mesh()
  out = {"devices": len(jax.devices())}
  refs = {}
  for name, stage in (("mge", fm.multiscale_schedule(h, 2)[0]),
                      ("single", fm.Stage((0,), (16,), 2))):
    ref, loss_ref, _, _ = run(stage, h, None)
    refs[name] = (ref, loss_ref)
    par, loss_par, on, all_reduce = run(stage, h, mesh)
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(par.params)))
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(ref.params))
    out[name] = {"max_abs_diff": diff, "param_scale": scale, "loss_1dev": loss_ref,
                 "loss_8dev": loss_par, "param_devices": on,
                 "all_reduce": all_reduce,
                 "work_units": [float(ref.work_units), float(par.work_units)]}
  # fm.train with a mesh: a 2-stage Full-Multiscale run, 2 steps per stage.
  model = TinyCNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  pool = smooth_images(jax.random.key(1), 64, 32)
  h2 = Hierarchy(levels=2, size=32, base_batch=8)
  stages = fm.full_multiscale_schedule(h2, (2, 2))
  finals, histories = [], []
  for kwargs in ({}, {"mesh": mesh}, {"level_parallel": True}):
    state, history = fm.train(params=params, stages=stages, hierarchy=h2,
                              loss_fn=mse_loss_fn(model), sample_fn=sample_fn, data=pool,
                              make_optimizer=lambda it: optax.adam(1e-2), seed=0,
                              progress=False, **kwargs)
    finals.append(state)
    histories.append(history)

  def diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y)))
               for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))

  out["train_max_abs_diff"] = diff(finals[0], finals[1])
  out["train_level_parallel_max_abs_diff"] = diff(finals[0], finals[2])
  out["train_work_units"] = [float(f.work_units) for f in finals]
  out["train_losses"] = [h["loss"] for h in histories]
  # The same run with a step cache, on a mesh over 4 of the 8 devices: the
  # second run loads every program and must put it on those 4 devices.
  import tempfile  # pylint: disable=g-import-not-at-top
  from mgtrain.step_cache import StepCache  # pylint: disable=g-import-not-at-top
  class CountingCache(StepCache):
    hits = 0

    def compile(self, *a, **kw):
      compiled, hit = super().compile(*a, **kw)
      self.hits += hit
      return compiled, hit

  cache_dir = tempfile.mkdtemp()
  cached = []
  for _ in range(2):
    cache = CountingCache(cache_dir)
    state, history = fm.train(params=params, stages=stages, hierarchy=h2,
                              loss_fn=mse_loss_fn(model), sample_fn=sample_fn, data=pool,
                              make_optimizer=lambda it: optax.adam(1e-2), seed=0,
                              progress=False, mesh=parallel.data_mesh(4), step_cache=cache,
                              step_cache_key="parallel_check adam 1e-2")
    cached.append({"losses": history["loss"], "max_abs_diff": diff(finals[0], state),
                   "programs": len(cache._in_memory), "hits": cache.hits,
                   "devices": sorted(d.id for d in jax.tree.leaves(state.params)[0].devices())})
  out["train_step_cache"] = cached
  # Level parallelism: the 3-level MGE step with its terms on device groups.
  stage = fm.multiscale_schedule(h, 2)[0]
  ref, loss_ref = refs["mge"]
  model = TinyCNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  pool = smooth_images(jax.random.key(1), 64, 32)
  tx = multiscale(optax.adam(1e-2), len(stage.levels))
  groups = level_parallel.device_groups(stage)
  step = level_parallel.make_level_parallel_step(stage, h, mse_loss_fn(model), sample_fn, tx,
                                                 groups)
  state, data = step.place(fm.init_state(params, seed=3, opt_state=tx.init(params)), pool)
  for _ in range(2):
    state, metrics = step(state, data)
  out["level_parallel"] = {
      "group_sizes": [len(g) for g in groups],
      "disjoint": len({d.id for g in groups for d in g}) == sum(len(g) for g in groups),
      "max_abs_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in
                          zip(jax.tree.leaves(ref.params), jax.tree.leaves(state.params))),
      "param_scale": max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(ref.params)),
      "loss_1dev": loss_ref, "loss_level_parallel": float(metrics["loss"]),
      "work_units": [float(ref.work_units), float(state.work_units)],
      "variance_finite": bool(jnp.all(jnp.isfinite(state.opt_state.variance)))}
  try:
    parallel.check_batches((8, 12), mesh)
    out["check_error"] = None
  except ValueError as e:
    out["check_error"] = str(e)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
