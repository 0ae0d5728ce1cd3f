"""Samples drawn on the mesh a term needs (mgtrain.sampling) against restricted fine samples."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_denoising_problem
from experiments.denoise import sample_denoise_batch
from mgtrain import full_multiscale as fm
from mgtrain import parallel
from mgtrain.hierarchy import Hierarchy, HierarchyError
from mgtrain.sampling import coarse_sampler, draw, draw_levels, draws_on_coarse_meshes
from mgtrain.split_step import SplitStep
from mgtrain.transform import multiscale


@pytest.mark.parametrize("subsample,restriction,steps,expected", [
    ("coarsen", "average", 1, 0.5), ("coarsen", "average", 3, 0.125),
    ("coarsen", "bilinear", 2, 0.25), ("coarsen", "nearest", 2, 1.0),
    ("crop", "average", 2, 1.0), ("coarsen+crop", "average", 3, 0.5)])
def test_white_noise_scale_is_the_law_of_restricted_noise(subsample, restriction, steps,
                                                          expected):
  """Unit white noise restricted ``steps`` levels has independent pixels of
  standard deviation ``white_noise_scale(steps)`` (measured on 2^18 coarse
  pixels: std to 1%, about 7 standard errors; neighbour correlation below
  0.01, about 5)."""
  h = Hierarchy(levels=4, size=64, base_batch=1, subsample=subsample, restriction=restriction)
  assert h.white_noise_scale(steps) == expected
  side = 64 >> steps
  n = 2 ** 18 // side ** 2
  z = jax.random.normal(jax.random.key(0), (n, 64, 64, 1))
  coarse = np.asarray(h.restrict({"z": z}, steps, jax.random.key(1))["z"])
  assert coarse.shape == (n, side, side, 1)
  np.testing.assert_allclose(coarse.std(), expected, rtol=0.01)
  right = np.mean(coarse[:, :, 1:] * coarse[:, :, :-1]) / coarse.var()
  down = np.mean(coarse[:, 1:] * coarse[:, :-1]) / coarse.var()
  assert abs(right) < 0.01 and abs(down) < 0.01


def test_white_noise_scale_errors():
  h = Hierarchy(levels=3, size=16, base_batch=1)
  assert h.white_noise_scale(0) == 1.0
  assert h.white_noise_scale(1, start_level=1) == 0.5
  with pytest.raises(HierarchyError, match="cannot restrict"):
    h.white_noise_scale(3)
  with pytest.raises(HierarchyError, match="cannot restrict"):
    h.white_noise_scale(-1)


def _restricting_sampler(fine, calls):
  """A coarse sampler that restricts ``fine``'s batch: the same values, on the coarse path."""
  @coarse_sampler
  def sample(data, key, n, *, hierarchy=None, level=0):
    calls.append(level)
    batch = fine(data, key, n)
    return hierarchy.restrict(batch, level) if level else batch
  return sample


@pytest.mark.parametrize("fuse_meshes,split", [(False, False), (True, False), (True, True)])
def test_step_with_a_coarse_sampler_matches_the_fine_one(fuse_meshes, split):
  """Three Adam steps of a 3-level stage: a sampler that draws each term on
  its finest mesh (here: restricting the same fine draw) gives the fine
  sampler's losses and parameters, and is asked for levels 0, 1 and 2."""
  h, params, pool, fine, loss_fn = tiny_denoising_problem(16, 3, 2)
  stage = fm.multiscale_schedule(h, 3)[0]
  tx = multiscale(optax.adam(1e-2), 3, level_terms=not fuse_meshes)
  calls = []
  coarse = _restricting_sampler(fine, calls)
  results = []
  for sample_fn in (fine, coarse):
    if split:
      step = SplitStep(stage, h, loss_fn, sample_fn, tx, fuse_meshes=fuse_meshes)
    else:
      step = jax.jit(fm.make_stage_step(stage, h, loss_fn, sample_fn, tx,
                                        fuse_meshes=fuse_meshes))
    state = fm.fresh_state(params, seed=3, tx=tx)
    losses = []
    for _ in range(3):
      state, metrics = step(state, pool)
      losses.append(float(metrics["loss"]))
    results.append((state, losses))
  assert sorted(set(calls)) == [0, 1, 2]   # level 0: the plain call
  (a, loss_a), (b, loss_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_draw_keeps_the_finest_mesh_when_it_cannot_draw_coarse():
  """Cropping hierarchies and unmarked samplers draw on the finest mesh; level
  0 always calls the sampler as ``sample_fn(data, key, n)``."""
  calls = []
  fine = lambda data, key, n: {"x": jnp.zeros((n, 16, 16, 1))}   # noqa: E731
  coarse = _restricting_sampler(fine, calls)
  key = jax.random.key(0)
  for subsample in ("crop", "coarsen+crop"):
    batch, level = draw(coarse, None, key, 2, Hierarchy(levels=3, size=16, base_batch=2, subsample=subsample), 2)
    assert level == 0 and batch["x"].shape == (2, 16, 16, 1)
  h = Hierarchy(levels=3, size=16, base_batch=2)
  assert draw(fine, None, key, 2, h, 2)[1] == 0
  assert draw(coarse, None, key, 2, h, 0)[1] == 0
  assert calls == [0, 0, 0]
  batches, levels = draw_levels(coarse, None, jax.random.split(key, 3), (2, 4, 8), h, (0, 1, 2))
  assert levels == (0, 1, 2) and calls == [0, 0, 0, 0, 1, 2]
  assert [b["x"].shape[1] for b in batches] == [16, 8, 4]
  assert draws_on_coarse_meshes(coarse) and not draws_on_coarse_meshes(fine)


def test_shard_batches_keeps_a_coarse_sampler_coarse():
  mesh = parallel.data_mesh(1)
  h = Hierarchy(levels=3, size=16, base_batch=2)
  fine = lambda data, key, n: {"x": jnp.ones((n, 16, 16, 1))}   # noqa: E731
  sharded = parallel.shard_batches(_restricting_sampler(fine, []), mesh)
  assert draws_on_coarse_meshes(sharded)
  batch, level = draw(sharded, None, jax.random.key(0), 2, h, 1)
  assert level == 1 and batch["x"].shape == (2, 8, 8, 1)
  assert not draws_on_coarse_meshes(parallel.shard_batches(fine, mesh))


@pytest.mark.parametrize("restriction", ["average", "nearest"])
def test_denoise_samples_on_a_coarse_level(restriction):
  """``sample_denoise_batch`` on level 2 gives exactly the restricted clean
  patches and noise levels ``t`` of the fine draw with the same key, and noise
  of the law restricted fine noise has (std to 2%, mean near 0)."""
  h = Hierarchy(levels=3, size=32, base_batch=1, restriction=restriction)
  pool = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3))
  key, n = jax.random.key(2), 512
  fine = sample_denoise_batch(pool, key, n)
  coarse = sample_denoise_batch(pool, key, n, hierarchy=h, level=2)
  assert coarse["u"].shape == (n, 8, 8, 3)
  np.testing.assert_allclose(coarse["y"], h.restrict(fine, 2)["y"], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(coarse["t"], fine["t"])
  u, y, t = (np.asarray(coarse[k], np.float64) for k in ("u", "y", "t"))
  keep = t < 0.9   # samples whose noise weight 1 - t is not tiny, so z is well determined
  z = ((u - t[:, None, None, None] * y) / (1 - t[:, None, None, None]))[keep]
  assert keep.sum() > 0.8 * n
  np.testing.assert_allclose(z.std(), h.white_noise_scale(2), rtol=0.02)
  assert abs(z.mean()) < 0.01
  assert sample_denoise_batch(pool, key, n, hierarchy=h, level=0)["u"].shape == (n, 32, 32, 3)
  np.testing.assert_array_equal(sample_denoise_batch(pool, key, 4, hierarchy=h)["u"],
                                sample_denoise_batch(pool, key, 4)["u"])


def test_denoise_sampler_errors():
  pool = jnp.zeros((2, 16, 16, 3))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="only coarsens"):
    sample_denoise_batch(pool, key, 2, level=1)
  with pytest.raises(ValueError, match="only coarsens"):
    sample_denoise_batch(pool, key, 2, hierarchy=Hierarchy(levels=3, size=16, base_batch=1, subsample="crop"), level=1)


def test_level_views_takes_one_input_level_per_batch():
  """Batches drawn on their terms' finest meshes give the views of restricted
  fine batches; a batch coarser than its term's mesh, or a level count that
  does not match, is refused."""
  from mgtrain.mge import level_views   # pylint: disable=g-import-not-at-top
  h = Hierarchy(levels=3, size=16, base_batch=2)
  keys = jax.random.split(jax.random.key(0), 3)
  fine = [{"x": jax.random.normal(k, (n, 16, 16, 1))} for k, n in zip(keys, h.batch_sizes)]
  drawn = [h.restrict(b, level) for level, b in enumerate(fine)]
  for got, want in zip(level_views(drawn, h, input_level=(0, 1, 2)), level_views(fine, h)):
    assert len(got) == len(want)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g["x"], w["x"])
  with pytest.raises(HierarchyError, match="coarser than its term's finest"):
    level_views(drawn, h, input_level=(0, 2, 2))
  with pytest.raises(HierarchyError, match="input levels for 3 batches"):
    level_views(drawn, h, input_level=(0, 1))


def test_a_sampler_that_ignores_n_is_refused():
  """A sampler that returns another batch size than it was asked for would
  train on other samples than the step counts #WU for; the step refuses it
  when it traces. A scalar leaf (no batch axis) is fine."""
  h, params, pool, sample_fn, loss_fn = tiny_denoising_problem(16, 2, 1)
  stage = fm.multiscale_schedule(h, 1)[0]                   # batches 1 and 2
  tx = multiscale(optax.sgd(0.1), len(stage.levels))
  state = fm.fresh_state(params, seed=0, tx=tx)

  def fixed_size(data, key, n):
    return sample_fn(data, key, 2)                           # ignores n

  def with_scalar(data, key, n):
    return {**sample_fn(data, key, n), "sigma": jnp.float32(0.1)}

  step = jax.jit(fm.make_stage_step(stage, h, loss_fn, fixed_size, tx))
  with pytest.raises(HierarchyError, match="asked for 1 samples but returned a leaf of shape"):
    step(state, pool)
  batch, level = draw(with_scalar, pool, jax.random.key(0), 2, h, 0)
  assert level == 0 and batch["sigma"].shape == ()
