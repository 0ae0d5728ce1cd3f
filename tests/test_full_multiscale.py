import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_denoising_problem
from mgtrain import full_multiscale as fm
from mgtrain import workunits as wu
from mgtrain.checkpoint import Checkpointer
from mgtrain.hierarchy import Hierarchy, HierarchyError

SIZE = 16


def _setup(levels=2, base_batch=1):
  return tiny_denoising_problem(SIZE, levels, base_batch)


def _train(stages, h, params, pool, sample_fn, loss_fn, **kw):
  return fm.train(params=params, stages=stages, hierarchy=h, loss_fn=loss_fn,
                  sample_fn=sample_fn, data=pool,
                  make_optimizer=lambda n: optax.adam(optax.cosine_decay_schedule(1e-2, n)),
                  progress=False, **kw)


def test_schedules_match_reference():
  h = Hierarchy(levels=4, size=64, base_batch=16)
  fms = fm.full_multiscale_schedule(h, (2000, 1000, 500, 250))
  assert [s.levels for s in fms] == [(3,), (2, 3), (1, 2, 3), (0, 1, 2, 3)]
  assert [s.batch_sizes for s in fms] == [(128,), (64, 128), (32, 64, 128),
                                          (16, 32, 64, 128)]
  assert fm.schedule_work_units(fms) == wu.full_multiscale_closed_form(16, 2000)
  assert fm.schedule_work_units(fm.multiscale_schedule(h, 2000)) == 74_000
  assert fm.schedule_work_units(fm.single_scale_schedule(h, 2000)) == 480_000
  with pytest.raises(HierarchyError, match="has 3 entries"):
    fm.full_multiscale_schedule(h, (4, 2, 1))
  with pytest.raises(ValueError, match="strategy must be one of"):
    fm.make_schedule("bogus", h, 10)


def test_locate():
  h = Hierarchy(levels=3, size=16)
  stages = fm.full_multiscale_schedule(h, (4, 2, 1))
  assert list(fm.stage_boundaries(stages)) == [0, 4, 6, 7]
  assert fm.locate(stages, 0) == (0, 0)
  assert fm.locate(stages, 5) == (1, 1)
  assert fm.locate(stages, 6) == (2, 0)
  assert fm.locate(stages, 7) == (3, 0)


@pytest.mark.parametrize("strategy", ["single", "multiscale", "full-multiscale"])
def test_live_work_units_equal_closed_form(strategy):
  h, params, pool, sample_fn, loss_fn = _setup(levels=3, base_batch=1)
  stages = fm.make_schedule(strategy, h, 4, (4, 2, 1))
  state, history = _train(stages, h, params, pool, sample_fn, loss_fn)
  assert int(state.step) == sum(s.iterations for s in stages)
  assert float(state.work_units) == float(fm.schedule_work_units(stages))
  assert history["work_units"][-1] == float(state.work_units)
  assert history["level"] == [s.mesh_level for s in stages for _ in range(s.iterations)]
  assert int(state.level) == 0


def test_full_multiscale_hot_starts_and_learns():
  h, params, pool, sample_fn, loss_fn = _setup(levels=2, base_batch=2)
  stages = fm.full_multiscale_schedule(h, (40, 20))

  def eval_fn(p):
    val = sample_fn(pool, jax.random.key(7), 16)
    return {"mse": jnp.mean(loss_fn(p, val))}

  state, history = _train(stages, h, params, pool, sample_fn, loss_fn, eval_fn=eval_fn)
  # One evaluation at the end of each stage; the fine stage starts from the
  # coarse solution, so its loss keeps going down.
  assert [e["step"] for e in history["evals"]] == [40, 60]
  first = float(eval_fn(params)["mse"])
  assert history["evals"][0]["mse"] < first
  assert history["evals"][1]["mse"] < first
  assert len(history["compile_seconds"]) == 2


@pytest.mark.parametrize("carry_optimizer", [True, False])
def test_compile_ahead_gives_the_same_run(tmp_path, carry_optimizer):
  """Each later stage's step compiled in the background, from the abstract
  state of the stage boundary, runs exactly as one compiled in the loop
  (with the step cache when the optimizer state is carried, without it when
  it starts afresh)."""
  from mgtrain.step_cache import StepCache
  h, params, pool, sample_fn, loss_fn = _setup(levels=3, base_batch=1)
  stages = fm.full_multiscale_schedule(h, (4, 3, 2))
  ref_state, ref_hist = _train(stages, h, params, pool, sample_fn, loss_fn,
                               carry_optimizer=carry_optimizer)
  assert "background_compile_seconds" not in ref_hist
  for cache in [StepCache(tmp_path)] if carry_optimizer else [None]:
    state, hist = _train(stages, h, params, pool, sample_fn, loss_fn, compile_ahead=True,
                         carry_optimizer=carry_optimizer, step_cache=cache,
                         step_cache_key=None if cache is None else "test")
    assert hist["loss"] == ref_hist["loss"]
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_array_equal(a, b)
    # Stage 0 compiles in the loop; stages 1 and 2 compiled in the background.
    background = hist["background_compile_seconds"]
    assert background[0] == 0.0 and background[1] > 0 and background[2] > 0
  # The cache holds the initial state and the three stages' steps, two of
  # them stored from the background thread.
  assert len(list(tmp_path.glob("*.step"))) == (4 if carry_optimizer else 0)


def test_compile_ahead_stops_with_the_run():
  h, params, pool, sample_fn, loss_fn = _setup(levels=2, base_batch=1)
  stages = fm.full_multiscale_schedule(h, (3, 2))
  state, hist = _train(stages, h, params, pool, sample_fn, loss_fn, compile_ahead=True,
                       stop_after=2)
  assert int(state.step) == 2 and hist["background_compile_seconds"] == [0.0, 0.0]


@pytest.mark.parametrize("other", ["iterations", "strategy", "hierarchy"])
def test_resume_refuses_a_checkpoint_of_another_schedule(tmp_path, other):
  """A checkpoint holds the schedule it was written under. Resumed with other
  stage iterations it used to continue silently, mixing two schedules; with
  another strategy, orbax failed on the state's structure. Both, and another
  hierarchy, are refused with the two schedules named, before any state is
  restored."""
  h, params, pool, sample_fn, loss_fn = _setup(levels=2, base_batch=1)
  ckpt = Checkpointer(tmp_path / "ckpt", every=1)
  _train(fm.full_multiscale_schedule(h, (4, 2)), h, params, pool, sample_fn, loss_fn,
         checkpointer=ckpt, stop_after=3)
  if other == "hierarchy":
    h = Hierarchy(levels=2, size=SIZE, base_batch=1, restriction="nearest")
  stages = {"iterations": fm.full_multiscale_schedule(h, (6, 2)),
            "strategy": fm.single_scale_schedule(h, 6),
            "hierarchy": fm.full_multiscale_schedule(h, (4, 2))}[other]
  with pytest.raises(ValueError, match="written by a run with another schedule"):
    _train(stages, h, params, pool, sample_fn, loss_fn, checkpointer=ckpt)
  assert ckpt.latest_step() == 3                           # nothing was trained or saved


@pytest.mark.parametrize("fuse_meshes", [False, True])
def test_resume_matches_uninterrupted(tmp_path, fuse_meshes):
  """Stop, resume from the checkpoint, and match the uninterrupted per-term run.

  With ``fuse_meshes`` (one pass per mesh, the transform without per-level
  statistics) the run must also match: it is the same estimate.
  """
  h, params, pool, sample_fn, loss_fn = _setup(levels=2, base_batch=1)
  stages = fm.full_multiscale_schedule(h, (4, 2))
  if fuse_meshes:
    stages = fm.multiscale_schedule(h, 6)
  ref_state, ref_hist = _train(stages, h, params, pool, sample_fn, loss_fn)

  ckpt = Checkpointer(tmp_path / "ckpt", every=2)
  # Stop mid-way (step 3 of 6)...
  state, _ = _train(stages, h, params, pool, sample_fn, loss_fn, checkpointer=ckpt,
                    stop_after=3, fuse_meshes=fuse_meshes)
  assert int(state.step) == 3
  ckpt.close()
  # ...and resume in a fresh checkpointer, as a new process would.
  ckpt = Checkpointer(tmp_path / "ckpt", every=2)
  assert ckpt.latest_step() == 3
  state, hist = _train(stages, h, params, pool, sample_fn, loss_fn, checkpointer=ckpt,
                       fuse_meshes=fuse_meshes)
  ckpt.close()
  assert int(state.step) == 6
  assert float(state.work_units) == float(ref_state.work_units)
  tol = 1e-4 if fuse_meshes else 1e-5   # by mesh: the same sums in another order
  np.testing.assert_allclose(hist["loss"], ref_hist["loss"], rtol=tol)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol / 10)


def test_a_stop_request_checkpoints_the_step_in_flight_and_resumes_exactly(tmp_path):
  """``stop_requested`` (the CLIs' first Ctrl-C) stops after the current step,
  which the history records and the checkpointer saves off its ``every``
  grid; the resumed run equals the uninterrupted one."""
  import threading   # pylint: disable=g-import-not-at-top
  h, params, pool, sample_fn, loss_fn = _setup(levels=2, base_batch=1)
  stages = fm.full_multiscale_schedule(h, (4, 2))
  ref_state, ref_hist = _train(stages, h, params, pool, sample_fn, loss_fn)
  stop, calls = threading.Event(), []

  def eval_fn(p):   # requests the stop while step 3 is recorded, as a signal could
    calls.append(1)
    if len(calls) == 3:
      stop.set()
    return {"norm": float(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p)))}

  ckpt = Checkpointer(tmp_path / "ckpt", every=100)
  state, hist = _train(stages, h, params, pool, sample_fn, loss_fn, checkpointer=ckpt,
                       eval_fn=eval_fn, eval_every=1, stop_requested=stop)
  ckpt.close()
  assert int(state.step) == 4 and hist["step"] == [1, 2, 3, 4]
  ckpt = Checkpointer(tmp_path / "ckpt", every=100)
  assert ckpt.latest_step() == 4
  state, hist = _train(stages, h, params, pool, sample_fn, loss_fn, checkpointer=ckpt)
  ckpt.close()
  assert int(state.step) == 6 and hist["step"] == list(range(1, 7))
  np.testing.assert_allclose(hist["loss"], ref_hist["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resume_at_stage_boundary(tmp_path):
  h, params, pool, sample_fn, loss_fn = _setup(levels=2, base_batch=1)
  stages = fm.full_multiscale_schedule(h, (4, 2))
  ref_state, _ = _train(stages, h, params, pool, sample_fn, loss_fn)
  ckpt = Checkpointer(tmp_path / "ckpt", every=100)
  _train(stages, h, params, pool, sample_fn, loss_fn, checkpointer=ckpt, stop_after=4)
  ckpt.close()
  ckpt = Checkpointer(tmp_path / "ckpt", every=100)
  state, _ = _train(stages, h, params, pool, sample_fn, loss_fn, checkpointer=ckpt)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_schedule_passed_to_adam_restarts_at_every_stage():
  """``optax.adam(cosine_decay_schedule(lr, n))`` keeps its schedule's step
  count in the optimizer state. Carried across a stage boundary unchanged,
  that count would sit at the previous stage's end, where the cosine is 0,
  and the finer stage would not move the parameters at all."""
  h, params, pool, sample_fn, loss_fn = _setup(levels=2, base_batch=1)
  stages = fm.full_multiscale_schedule(h, (6, 3))
  coarse, _ = _train(stages, h, params, pool, sample_fn, loss_fn, stop_after=6)
  both, _ = _train(stages, h, params, pool, sample_fn, loss_fn)
  moved = max(float(jnp.max(jnp.abs(a - b)))
              for a, b in zip(jax.tree.leaves(coarse.params), jax.tree.leaves(both.params)))
  assert moved > 1e-4                       # three Adam steps at a rate near 1e-2
  adam, schedule = both.opt_state.inner_state
  assert int(adam.count) == 9 and int(schedule.count) == 3


def test_carry_inner_state_keeps_moments_and_restarts_schedule():
  params = {"w": jnp.ones(3)}
  make = lambda n: optax.inject_hyperparams(optax.adam)(
      learning_rate=optax.cosine_decay_schedule(1e-2, n))
  old_tx = make(4)
  state = old_tx.init(params)
  for _ in range(3):
    _, state = old_tx.update({"w": jnp.ones(3)}, state, params)
  fresh = make(8).init(params)
  carried = fm.carry_inner_state(state, fresh)
  assert int(carried.count) == 0                     # the schedule restarts
  _, after = make(8).update({"w": jnp.ones(3)}, carried, params)
  np.testing.assert_allclose(after.hyperparams["learning_rate"], 1e-2, rtol=1e-6)
  np.testing.assert_array_equal(carried.inner_state[0].mu["w"],
                                state.inner_state[0].mu["w"])  # moments survive
  assert int(carried.inner_state[0].count) == 3      # Adam's bias correction goes on
  # A different optimizer structure cannot be carried: start afresh.
  other = optax.sgd(0.1).init(params)
  assert fm.carry_inner_state(state, other) is other


def test_host_data_is_put_on_the_device_once():
  """A numpy pool is copied to the device once, not at every step: with
  implicit host-to-device transfers disallowed the run still trains (it
  raised at the first step before), and gives the device pool's result."""
  h, params, pool, sample_fn, loss_fn = _setup(levels=2, base_batch=1)
  stages = fm.full_multiscale_schedule(h, (3, 2))
  on_device, _ = _train(stages, h, params, pool, sample_fn, loss_fn)
  with jax.transfer_guard_host_to_device("disallow"):
    on_host, _ = _train(stages, h, params, jax.tree.map(np.asarray, pool), sample_fn, loss_fn)
  for a, b in zip(jax.tree.leaves(on_device.params), jax.tree.leaves(on_host.params)):
    np.testing.assert_array_equal(a, b)
