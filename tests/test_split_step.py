"""The step as one program per mesh (mgtrain.split_step) against the one-program step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_denoising_problem
from mgtrain import full_multiscale as fm
from mgtrain.split_step import SplitStep
from mgtrain.step_cache import StepCache
from mgtrain.transform import multiscale

SIZE = 16


def _problem(levels=3, subsample="coarsen", fuse_meshes=True):
  h, params, pool, sample_fn, loss_fn = tiny_denoising_problem(SIZE, levels, 2, subsample)
  stage = fm.multiscale_schedule(h, 3)[0]
  tx = multiscale(optax.adam(1e-2), levels, level_terms=not fuse_meshes)

  def state(seed=3):   # a new one each time: the split step donates its state
    return fm.fresh_state(params, seed=seed, tx=tx)

  return stage, h, loss_fn, sample_fn, tx, state, pool


def _one_program_steps(stage, h, loss_fn, sample_fn, tx, state, pool, steps, **kw):
  step = jax.jit(fm.make_stage_step(stage, h, loss_fn, sample_fn, tx, **kw))
  out = []
  for _ in range(steps):
    state, metrics = step(state, pool)
    out.append(metrics)
  return state, out


def _assert_same_steps(a, b, tol):
  (state_a, metrics_a), (state_b, metrics_b) = a, b
  assert int(state_a.step) == int(state_b.step)
  assert float(state_a.work_units) == float(state_b.work_units)
  for m_a, m_b in zip(metrics_a, metrics_b):
    np.testing.assert_allclose(m_a["terms"], m_b["terms"], rtol=tol, atol=tol)
    np.testing.assert_allclose(m_a["loss"], m_b["loss"], rtol=tol, atol=tol)
  for x, y in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("fuse_meshes,subsample,sequential,chunk", [
    (True, "coarsen", False, None), (True, "crop", True, 64), (True, "coarsen+crop", False, 64),
    (False, "coarsen", True, None), (False, "coarsen+crop", False, 64)])
def test_split_step_matches_one_program(fuse_meshes, subsample, sequential, chunk):
  """Three Adam steps: the same samples, losses and parameters (float rounding),
  by term (the per-level statistics too) and by mesh."""
  stage, h, loss_fn, sample_fn, tx, state, pool = _problem(subsample=subsample,
                                                           fuse_meshes=fuse_meshes)
  reference = _one_program_steps(stage, h, loss_fn, sample_fn, tx, state(), pool, 3,
                                 sequential=sequential, max_pixels_per_chunk=chunk,
                                 fuse_meshes=fuse_meshes)
  split = SplitStep(stage, h, loss_fn, sample_fn, tx, max_pixels_per_chunk=chunk,
                    sequential=sequential, fuse_meshes=fuse_meshes)
  compiled = split.compile(state(), pool)
  assert set(compiled.hits) == {"prepare", "pass 0", "pass 1", "pass 2", "update"}
  # With a chunk size, some pass runs as several calls of its chunk program.
  assert (max(compiled.chunks) > 1) == (chunk is not None)
  assert not any(compiled.hits.values())
  out = []
  s = state()
  for _ in range(3):
    s, metrics = compiled(s, pool)
    out.append(metrics)
  _assert_same_steps(reference, (s, out), 1e-5)
  if not fuse_meshes:   # the transform's per-level statistics, from the stacked terms
    np.testing.assert_allclose(s.opt_state.sq_norm, reference[0].opt_state.sq_norm, rtol=1e-4)
  # Called directly (jitted on first use), it gives the same numbers as compiled.
  s2 = state()
  out2 = []
  for _ in range(3):
    s2, metrics = split(s2, pool)
    out2.append(metrics)
  _assert_same_steps((s, out), (s2, out2), 0.0)


def test_split_step_differs_when_it_should():
  """The comparison above can fail: another seed draws other samples."""
  stage, h, loss_fn, sample_fn, tx, state, pool = _problem()
  reference = _one_program_steps(stage, h, loss_fn, sample_fn, tx, state(), pool, 1,
                                 fuse_meshes=True)
  s, metrics = SplitStep(stage, h, loss_fn, sample_fn, tx, fuse_meshes=True)(state(seed=4), pool)
  # The same seed gives the same step, so the difference below is the seed's.
  same, same_metrics = SplitStep(stage, h, loss_fn, sample_fn, tx, fuse_meshes=True)(state(), pool)
  _assert_same_steps(reference, (same, [same_metrics]), 1e-5)
  with pytest.raises(AssertionError):
    _assert_same_steps(reference, (s, [metrics]), 1e-5)


def test_split_step_through_step_cache(tmp_path):
  """Every program is stored, then loaded by a fresh cache, with the same result."""
  stage, h, loss_fn, sample_fn, tx, state, pool = _problem(levels=2)
  split = SplitStep(stage, h, loss_fn, sample_fn, tx, fuse_meshes=True)
  first = split.compile(state(), pool, step_cache=StepCache(tmp_path), key="tiny", workers=1)
  assert not any(first.hits.values())
  assert len(list(tmp_path.glob("*.step"))) == 4          # prepare, 2 passes, update
  second = split.compile(state(), pool, step_cache=StepCache(tmp_path), key="tiny")
  assert all(second.hits.values())
  a, metrics_a = first(state(), pool)
  b, metrics_b = second(state(), pool)
  np.testing.assert_array_equal(metrics_a["terms"], metrics_b["terms"])
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("chunk", [None, 64])
def test_warm_compile_traces_no_model_pass(tmp_path, chunk):
  """From a warm step cache, a fresh SplitStep loads every program without
  calling the loss (no pass is traced, not even for its shapes), and the
  loaded step computes what the compiled one did (chunk programs too)."""
  stage, h, loss_fn, sample_fn, tx, state, pool = _problem(levels=2, fuse_meshes=False)
  calls = []

  def counted_loss(params, batch):
    calls.append(1)
    return loss_fn(params, batch)

  def build():
    return SplitStep(stage, h, counted_loss, sample_fn, tx, sequential=True,
                     max_pixels_per_chunk=chunk)

  first = build().compile(state(), pool, step_cache=StepCache(tmp_path), key="tiny")
  assert calls and not any(first.hits.values())
  assert (max(first.chunks) > 1) == (chunk is not None)
  calls.clear()
  second = build().compile(state(), pool, step_cache=StepCache(tmp_path), key="tiny")
  assert all(second.hits.values()) and not calls
  a, metrics_a = first(state(), pool)
  b, metrics_b = second(state(), pool)
  np.testing.assert_array_equal(metrics_a["terms"], metrics_b["terms"])
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fuse_meshes", [True, False])
def test_chunked_pass_is_one_program_called_per_chunk(fuse_meshes):
  """A chunked pass compiles one chunk program (the loss is traced as often as
  for the unchunked step, not once per chunk), and its calls add up to the
  one-program step's chunked sum, past MAX_CHUNKS chunks too."""
  stage, h, loss_fn, sample_fn, tx, state, pool = _problem(levels=2, fuse_meshes=fuse_meshes)
  stage = fm.Stage(stage.levels, (20, 10), stage.iterations)   # 20 and 30 samples a pass
  calls = []

  def counted_loss(params, batch):
    calls.append(1)
    return loss_fn(params, batch)

  traces = {}
  for chunk in (None, 64):
    calls.clear()
    split = SplitStep(stage, h, counted_loss, sample_fn, tx, max_pixels_per_chunk=chunk,
                      sequential=True, fuse_meshes=fuse_meshes)
    compiled = split.compile(state(), pool)
    traces[chunk] = len(calls)
  assert traces[64] == traces[None]
  assert max(compiled.chunks) > 16   # the one-program step caps its unrolled chunks at 16
  reference = _one_program_steps(stage, h, loss_fn, sample_fn, tx, state(), pool, 2,
                                 sequential=True, max_pixels_per_chunk=64,
                                 fuse_meshes=fuse_meshes)
  out, s = [], state()
  for _ in range(2):
    s, metrics = compiled(s, pool)
    out.append(metrics)
  _assert_same_steps(reference, (s, out), 1e-5)


def test_split_step_errors(tmp_path):
  stage, h, loss_fn, sample_fn, tx, state, pool = _problem(levels=2)
  split = SplitStep(stage, h, loss_fn, sample_fn, tx, fuse_meshes=True)
  with pytest.raises(ValueError, match="needs a key"):
    split.compile(state(), pool, step_cache=StepCache(tmp_path))
  with pytest.raises(ValueError, match="workers must be at least 1"):
    split.compile(state(), pool, workers=0)
  scalar = SplitStep(stage, h, lambda p, b: jnp.mean(loss_fn(p, b)), sample_fn, tx,
                     fuse_meshes=True)
  with pytest.raises(ValueError, match=r"per-sample loss of shape \(B,\)"):
    scalar(state(), pool)


def test_train_with_split_step_matches_one_program(tmp_path):
  """A three-stage Full-Multiscale run by mesh, compiled ahead and through a step cache."""
  stage, h, loss_fn, sample_fn, tx, state, pool = _problem()
  params = state().params
  stages = fm.full_multiscale_schedule(h, (3, 2, 2))
  kwargs = dict(params=params, stages=stages, hierarchy=h, loss_fn=loss_fn, sample_fn=sample_fn,
                data=pool, make_optimizer=lambda n: optax.adam(1e-2), progress=False,
                fuse_meshes=True)
  one, history_one = fm.train(**kwargs)
  split, history_split = fm.train(split_step=True, compile_ahead=True,
                                  step_cache=StepCache(tmp_path), step_cache_key="tiny", **kwargs)
  np.testing.assert_allclose(history_one["loss"], history_split["loss"], rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(split.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # The fresh state, then 3 stages of 1, 2 and 3 meshes, each with a prepare
  # and an update program.
  assert len(list(tmp_path.glob("*.step"))) == 1 + 3 + 4 + 5
  with pytest.raises(ValueError, match="split_step runs on one device"):
    fm.train(**kwargs, split_step=True, mesh=jax.make_mesh((1,), ("data",)))


@pytest.mark.parametrize("sequential", [True, False])
def test_stages_share_pass_programs(sequential):
  """By term, the second stage of a Full-Multiscale schedule reuses the first's
  pass program for its coarser term (the same program object), and its steps
  still equal the one-program step's."""
  _, h, loss_fn, sample_fn, _, state, pool = _problem(levels=2, fuse_meshes=False)
  params = state().params
  coarse, fine = fm.full_multiscale_schedule(h, (2, 2))
  shared = {}
  compiled = []
  for stage in (coarse, fine):
    tx = multiscale(optax.adam(1e-2), len(stage.levels), level_terms=True)
    state = fm.fresh_state(params, seed=3, tx=tx, level=stage.mesh_level)
    compiled.append(SplitStep(stage, h, loss_fn, sample_fn, tx, sequential=sequential,
                              max_pixels_per_chunk=64).compile(state, pool, shared=shared))
  first, second = compiled
  assert not any(first.reused.values())
  assert second.reused == {"prepare": False, "pass 0": False, "pass 1": True, "update": False}
  assert second.programs["pass 1"] is first.programs["pass 0"]
  assert len(shared) == 2
  tx = multiscale(optax.adam(1e-2), 2, level_terms=True)
  state = lambda: fm.fresh_state(params, seed=3, tx=tx, level=fine.mesh_level)  # noqa: E731
  reference = _one_program_steps(fine, h, loss_fn, sample_fn, tx, state(), pool, 2,
                                 sequential=sequential, max_pixels_per_chunk=64)
  out, s = [], state()
  for _ in range(2):
    s, metrics = second(s, pool)
    out.append(metrics)
  _assert_same_steps(reference, (s, out), 1e-5)


def test_shared_passes_need_the_same_signature():
  """A pass is not reused across chunkings or by mesh across numbers of terms."""
  _, h, loss_fn, sample_fn, _, state, pool = _problem(levels=2, fuse_meshes=True)
  coarse, fine = fm.full_multiscale_schedule(h, (2, 2))
  for fuse, chunks in ((True, (None, None)), (False, (None, 64))):
    shared = {}
    for stage, chunk in zip((coarse, fine), chunks):
      tx = multiscale(optax.adam(1e-2), len(stage.levels), level_terms=not fuse)
      s = fm.fresh_state(state().params, seed=3, tx=tx, level=stage.mesh_level)
      compiled = SplitStep(stage, h, loss_fn, sample_fn, tx, max_pixels_per_chunk=chunk,
                           fuse_meshes=fuse).compile(s, pool, shared=shared)
    assert not any(compiled.reused.values())
    assert len(shared) == 3


def test_train_by_term_compiles_one_pass_per_stage(tmp_path):
  """Full-Multiscale by term with the split step: the same run as one program,
  and the step cache holds one pass per stage (the others were reused)."""
  _, h, loss_fn, sample_fn, _, state, pool = _problem(fuse_meshes=False)
  stages = fm.full_multiscale_schedule(h, (3, 2, 2))
  kwargs = dict(params=state().params, stages=stages, hierarchy=h, loss_fn=loss_fn,
                sample_fn=sample_fn, data=pool, make_optimizer=lambda n: optax.adam(1e-2),
                progress=False, sequential=True)
  one, history_one = fm.train(**kwargs)
  split, history_split = fm.train(split_step=True, step_cache=StepCache(tmp_path),
                                  step_cache_key="tiny", **kwargs)
  np.testing.assert_allclose(history_one["loss"], history_split["loss"], rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(split.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # The fresh state, then per stage a prepare, one new pass and an update.
  assert len(list(tmp_path.glob("*.step"))) == 1 + 3 * 3
