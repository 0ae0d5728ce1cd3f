import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TinyCNN, mse_loss_fn, smooth_images
from mgtrain.hierarchy import Hierarchy, HierarchyError
from mgtrain.mge import (MAX_CHUNKS, chunk_cap, chunk_size, combine_level_grads, mesh_groups,
                         level_views, mge_loss,
                         mge_value_and_grad, mge_value_and_grad_by_mesh, sequence_after,
                         sum_over_chunks)


def _batch(key, n, size=16):
  k1, k2 = jax.random.split(key)
  x = smooth_images(k1, n, size) + 0.1 * jax.random.normal(k2, (n, size, size, 1))
  return {"x": x, "y": jnp.roll(x, 1, axis=1)}


@pytest.mark.parametrize("restriction", ["average", "bilinear", "nearest"])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_same_samples_telescope_to_fine_gradient(tiny_model, restriction, levels):
  model, params = tiny_model
  loss_fn = mse_loss_fn(model)
  h = Hierarchy(levels=levels, size=16, base_batch=4, restriction=restriction)
  batch = _batch(jax.random.key(1), 4)
  loss, level_grads, terms = mge_value_and_grad(loss_fn, params, [batch] * levels, h)
  fine_loss, fine_grad = jax.value_and_grad(
      lambda p: jnp.mean(loss_fn(p, batch)))(params)
  np.testing.assert_allclose(loss, fine_loss, rtol=1e-5)
  np.testing.assert_allclose(terms.sum(), fine_loss, rtol=1e-5)
  combined = combine_level_grads(level_grads)
  for a, b in zip(jax.tree.leaves(combined), jax.tree.leaves(fine_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The scalar loss's gradient is the same estimate.
  g = jax.grad(lambda p: mge_loss(loss_fn, p, [batch] * levels, h))(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(combined)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unbiased_for_linear_in_params_model():
  """E[MGE] equals the fine-mesh expected gradient (Eq. 5) for a linear model.

  The model is Example 1's: a 3x3 convolution with weights theta and the
  linear loss l = mean((u * theta) y). Data are drawn uniformly from a fixed
  pool, so the fine expected gradient is the exact mean over the pool.
  """
  pool_x = smooth_images(jax.random.key(0), 64, 16) + 0.3 * jax.random.normal(
      jax.random.key(1), (64, 16, 16, 1))
  pool_y = smooth_images(jax.random.key(2), 64, 16)
  theta = jnp.zeros((3, 3, 1, 1))

  def loss_fn(w, batch):
    out = jax.lax.conv_general_dilated(batch["x"], w, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(out * batch["y"], axis=(1, 2, 3))

  h = Hierarchy(levels=3, size=16, base_batch=2)

  def estimate(key):
    keys = jax.random.split(key, 3)
    batches = []
    for k, n in zip(keys, h.batch_sizes):
      idx = jax.random.randint(k, (n,), 0, 64)
      batches.append({"x": pool_x[idx], "y": pool_y[idx]})
    return combine_level_grads(mge_value_and_grad(loss_fn, theta, batches, h)[1])

  draws = jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.key(5), 4000))
  mean = draws.mean(axis=0)
  stderr = draws.std(axis=0) / np.sqrt(draws.shape[0])
  exact = jax.grad(lambda w: jnp.mean(loss_fn(w, {"x": pool_x, "y": pool_y})))(theta)
  assert np.all(np.abs(mean - exact) < 4 * stderr + 1e-7), (mean - exact) / stderr
  # ...and it is not trivially true: one coarse level alone is biased.
  coarse = h.restrict({"x": pool_x, "y": pool_y}, 2)
  coarse_grad = jax.grad(lambda w: jnp.mean(loss_fn(w, coarse)))(theta)
  assert np.max(np.abs(coarse_grad - exact) / (stderr + 1e-7)) > 10


def test_one_jitted_step_no_recompile(tiny_model):
  model, params = tiny_model
  traces = []

  def loss_fn(p, batch):
    traces.append(1)
    return mse_loss_fn(model)(p, batch)

  h = Hierarchy(levels=3, size=16, base_batch=2)
  step = jax.jit(lambda p, bs: mge_value_and_grad(loss_fn, p, bs, h))
  batches = [_batch(jax.random.key(i), n) for i, n in enumerate(h.batch_sizes)]
  step(params, batches)
  n_traces = len(traces)
  assert n_traces == 5  # 2 evaluations for each correction term + the coarsest
  batches2 = [_batch(jax.random.key(10 + i), n) for i, n in enumerate(h.batch_sizes)]
  step(params, batches2)
  assert len(traces) == n_traces
  assert step._cache_size() == 1


def test_level_subset_and_shapes(tiny_model):
  model, params = tiny_model
  h = Hierarchy(levels=3, size=16, base_batch=2)
  batches = [_batch(jax.random.key(i), n) for i, n in zip(range(2), (4, 8))]
  loss, grads, terms = mge_value_and_grad(mse_loss_fn(model), params, batches, h,
                                          levels=(1, 2))
  assert terms.shape == (2,)
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
    assert g.shape == (2,) + p.shape


def test_crop_needs_key_and_runs(tiny_model):
  model, params = tiny_model
  h = Hierarchy(levels=2, size=16, base_batch=2, subsample="crop")
  batches = [_batch(jax.random.key(0), 2), _batch(jax.random.key(1), 4)]
  with pytest.raises(HierarchyError, match="PRNG key"):
    mge_value_and_grad(mse_loss_fn(model), params, batches, h)
  loss, _, _ = mge_value_and_grad(mse_loss_fn(model), params, batches, h,
                                  key=jax.random.key(2))
  assert np.isfinite(loss)


def test_errors(tiny_model):
  model, params = tiny_model
  h = Hierarchy(levels=3, size=16, base_batch=2)
  b = _batch(jax.random.key(0), 2)
  with pytest.raises(HierarchyError, match="one batch per level"):
    mge_value_and_grad(mse_loss_fn(model), params, [b, b], h)
  with pytest.raises(HierarchyError, match="consecutive"):
    mge_value_and_grad(mse_loss_fn(model), params, [b, b], h, levels=(0, 2))
  with pytest.raises(HierarchyError, match="outside"):
    mge_value_and_grad(mse_loss_fn(model), params, [b], h, levels=(3,))
  # One batch, not a list of them.
  with pytest.raises(TypeError, match="a list with one batch per level"):
    mge_value_and_grad(mse_loss_fn(model), params, b, h)
  # Images on another mesh than the one the batch arrives on (an 8^2 batch
  # for a 16^2 hierarchy; a 16^2 batch announced on level 1, whose mesh is 8^2),
  # in both forms of the estimator.
  small = jax.tree.map(lambda x: x[:, ::2, ::2], b)
  for estimate in (mge_value_and_grad, mge_value_and_grad_by_mesh):
    with pytest.raises(HierarchyError, match=r"batch 0 arrives on level 0, whose mesh is "
                                             r"16x16 .* \(2, 8, 8, 1\)"):
      estimate(mse_loss_fn(model), params, [small, b, b], h)
    with pytest.raises(HierarchyError, match="batch 1 arrives on level 1, whose mesh is 8x8"):
      estimate(mse_loss_fn(model), params, [b, b, b], h, input_level=(0, 1, 1))
  # The same batch announced on its own mesh is fine.
  loss, _, _ = mge_value_and_grad(mse_loss_fn(model), params, [b, small, small], h,
                                  input_level=(0, 1, 1))
  assert np.isfinite(loss)


def test_chunked_evaluation_gives_the_same_estimate(tiny_model):
  model, params = tiny_model
  h = Hierarchy(levels=3, size=16, base_batch=4)
  batches = [_batch(jax.random.key(i), n) for i, n in enumerate(h.batch_sizes)]
  ref = mge_value_and_grad(mse_loss_fn(model), params, batches, h)
  # 16x16 = 256 pixels: chunks of 2 samples on level 0, 4 on level 1, ...
  out = jax.jit(lambda p, b: mge_value_and_grad(
      mse_loss_fn(model), p, b, h, max_pixels_per_chunk=512))(params, batches)
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-5)
  np.testing.assert_allclose(out[2], ref[2], rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 5, 16, 28, 240])
@pytest.mark.parametrize("pixels", [64, 1024, 4096, 65536])
@pytest.mark.parametrize("max_pixels", [None, 8192, 2**18])
def test_chunk_size_against_brute_force(batch, pixels, max_pixels):
  """Divides the batch; within the pixel budget, else as few chunks as allowed."""
  divisors = [c for c in range(1, batch + 1) if batch % c == 0]
  fits = [c for c in divisors if max_pixels is None or c * pixels <= max_pixels]
  capped = [c for c in divisors if batch // c <= 16]
  expected = max(max(fits, default=1), min(capped))
  assert chunk_size(batch, pixels, max_pixels) == expected
  uncapped = chunk_size(batch, pixels, max_pixels, max_chunks=None)
  assert uncapped == max(fits, default=1)


@pytest.mark.parametrize("max_pixels", [0, -5])
def test_chunk_size_rejects_a_budget_below_one_pixel(max_pixels):
  """0 or a negative budget is an error, not silently one image per chunk."""
  with pytest.raises(ValueError, match="max_pixels must be a positive"):
    chunk_size(16, 64, max_pixels)


@pytest.mark.parametrize("levels,chunk", [(1, None), (3, None), (3, 512)])
def test_by_mesh_equals_per_term_estimate(tiny_model, levels, chunk):
  """One pass per mesh gives Eq. 6's loss, terms and summed gradient."""
  model, params = tiny_model
  h = Hierarchy(levels=levels, size=16, base_batch=2, restriction="nearest")
  batches = [_batch(jax.random.key(10 + i), n) for i, n in enumerate(h.batch_sizes)]
  loss, level_grads, terms = jax.jit(lambda p, b: mge_value_and_grad(
      mse_loss_fn(model), p, b, h))(params, batches)
  out = jax.jit(lambda p, b: mge_value_and_grad_by_mesh(
      mse_loss_fn(model), p, b, h, max_pixels_per_chunk=chunk))(params, batches)
  np.testing.assert_allclose(out[0], loss, rtol=1e-5)
  np.testing.assert_allclose(out[2], terms, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(combine_level_grads(level_grads))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_bfloat16_loss_is_averaged_and_differenced_in_float32(tiny_model):
  """A term is a small difference of two means; in bfloat16 (3 significant
  digits) it came out rounded: 1.4% off the same values averaged in
  float32 (seen on a bf16 model). Per term, the estimate now averages in
  float32, as the per-mesh form's float32 weights always did."""
  model, params = tiny_model
  h = Hierarchy(levels=3, size=16, base_batch=2, restriction="average")
  batches = [_batch(jax.random.key(20 + i), n) for i, n in enumerate(h.batch_sizes)]
  bf16_loss = lambda p, b: mse_loss_fn(model)(p, b).astype(jnp.bfloat16)
  loss, _, terms = mge_value_and_grad(bf16_loss, params, batches, h)
  ref_loss, _, ref_terms = mge_value_and_grad_by_mesh(bf16_loss, params, batches, h)
  assert terms.dtype == jnp.float32 and loss.dtype == jnp.float32
  np.testing.assert_allclose(terms, ref_terms, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


def test_mesh_groups_concatenate_same_mesh_views():
  h = Hierarchy(levels=3, size=16, base_batch=2)
  batches = [{"x": jnp.full((n, 16, 16, 1), float(k))} for k, n in enumerate(h.batch_sizes)]
  groups = mesh_groups(level_views(batches, h))
  assert [g[0]["x"].shape for g in groups] == [(2, 16, 16, 1), (6, 8, 8, 1), (12, 4, 4, 1)]
  # Mesh 1 holds term 0's coarse view (-1/2), then term 1's fine view (+1/4).
  np.testing.assert_allclose(groups[1][1], [-0.5] * 2 + [0.25] * 4)
  np.testing.assert_array_equal(groups[1][2], [0] * 2 + [1] * 4)
  np.testing.assert_array_equal(groups[1][0]["x"][:, 0, 0, 0], [0] * 2 + [1] * 4)


def test_by_mesh_needs_per_sample_loss(tiny_model):
  model, params = tiny_model
  h = Hierarchy(levels=2, size=16, base_batch=2)
  batches = [_batch(jax.random.key(i), n) for i, n in enumerate(h.batch_sizes)]
  with pytest.raises(ValueError, match="per-sample loss"):
    mge_value_and_grad_by_mesh(lambda p, b: jnp.mean(mse_loss_fn(model)(p, b)), params,
                               batches, h)


def test_sequence_after_keeps_every_value_bitwise():
  """Adding the computed -0.0 is the identity, whatever ``done`` holds."""
  x = jnp.array([-0.0, 0.0, 1.5, -2.0, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
  batch = {"x": x, "h": x.astype(jnp.bfloat16), "i": jnp.arange(3)}
  for done in ({"g": jnp.array([1.0, 2.0])}, {"g": jnp.array([jnp.nan])},
               {"g": jnp.array([jnp.inf, -jnp.inf])}, (jnp.ones(2, jnp.complex64),)):
    out = jax.jit(sequence_after)(batch, done)
    for key in ("x", "h", "i"):
      assert out[key].dtype == batch[key].dtype
      np.testing.assert_array_equal(np.asarray(out[key]).view(np.uint8),
                                    np.asarray(batch[key]).view(np.uint8))
  # Nothing floating to depend on: the batch comes back as it is.
  assert sequence_after(batch, {"n": jnp.arange(2)}) is batch


def _planned_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("by_mesh", [False, True])
def test_sequential_passes_plan_the_largest_pass_not_the_sum(by_mesh):
  """Same estimate; working memory about that of the finest pass alone.

  Meshes 32^2 x 4, 16^2 x 12, 8^2 x 24 hold 4096 : 3072 : 1536 pixels, so
  running them side by side plans ~2.1x the finest pass's memory.
  """
  model = TinyCNN(features=32)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  h = Hierarchy(levels=3, size=32, base_batch=4, restriction="nearest")
  batches = [_batch(jax.random.key(20 + i), n, size=32) for i, n in enumerate(h.batch_sizes)]
  estimate = mge_value_and_grad_by_mesh if by_mesh else mge_value_and_grad

  def run(sequential):
    return lambda p, b: estimate(mse_loss_fn(model), p, b, h, sequential=sequential)

  ref, out = jax.jit(run(False))(params, batches), jax.jit(run(True))(params, batches)
  # Same arithmetic, possibly fused differently: float rounding only (a
  # correction term is a difference of two means, hence the atol).
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
  finest = _planned_bytes(jax.value_and_grad(
      lambda p, b: jnp.mean(mse_loss_fn(model)(p, b))), params, batches[0])
  side_by_side, one_by_one = (_planned_bytes(run(s), params, batches) for s in (False, True))
  assert side_by_side > 1.6 * finest
  assert one_by_one < 1.25 * finest


def test_sequential_chunks_plan_one_chunk():
  model = TinyCNN(features=32)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  batch = _batch(jax.random.key(3), 32)
  vg = jax.value_and_grad(lambda p, b: jnp.mean(mse_loss_fn(model)(p, b)))

  def chunked(sequential):
    return lambda p, b: sum_over_chunks(lambda c: vg(p, c), b, 8, sequential)

  ref, out = jax.jit(chunked(False))(params, batch), jax.jit(chunked(True))(params, batch)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
  one_chunk = _planned_bytes(vg, params, jax.tree.map(lambda x: x[:4], batch))
  side_by_side = _planned_bytes(chunked(False), params, batch)
  one_by_one = _planned_bytes(chunked(True), params, batch)
  assert side_by_side > 4 * one_chunk
  # One chunk's worth with XLA's default CPU flags (0.8 MB against 3.2 MB
  # side by side here); with the CLIs' flags (YNNPACK off, oneDNN) this tiny
  # model keeps about 4 chunks' (1.6 MB against 2.7 MB), so the bound is
  # relative. The ResNet's b240 at 256^2 in 16 chunks plans 1.2 chunks'.
  assert one_by_one < 0.65 * side_by_side


def test_sequential_chunks_are_one_rolled_copy_of_the_pass():
  """The rolled loop traces the pass a fixed number of times, however many
  chunks, and adds the chunks in the unrolled order."""
  model = TinyCNN(features=8)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  batch = _batch(jax.random.key(3), 24)
  vg = jax.value_and_grad(lambda p, b: jnp.mean(mse_loss_fn(model)(p, b)))
  traces = []

  def counted(p, c):
    traces.append(1)
    return vg(p, c)

  def program(k, sequential):
    traces.clear()
    fn = jax.jit(lambda p, b: sum_over_chunks(lambda c: counted(p, c), b, k, sequential))
    return fn.lower(params, batch).compile(), len(traces)

  (rolled3, n3), (rolled12, n12) = program(3, True), program(12, True)
  _, unrolled12 = program(12, False)
  assert n3 == n12 <= 2 and unrolled12 == 12
  assert "while" in rolled12.as_text()
  for k, rolled in ((3, rolled3), (12, rolled12)):
    unrolled, _ = program(k, False)
    for a, b in zip(jax.tree.leaves(rolled(params, batch)), jax.tree.leaves(unrolled(params, batch))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sequential", [False, True])
def test_only_the_rolled_loop_body_takes_forward_conv_kernel_gradients(sequential):
  """The models' direct convs take their custom VJP in the rolled loop's
  body alone (mgtrain.nn.direct_conv); unrolled chunks keep XLA's own."""
  from mgtrain.nn import direct_conv
  seen = []

  def fn(chunk):
    seen.append(direct_conv._AS_FORWARD_CONVS.get())
    return jnp.sum(chunk)

  jax.make_jaxpr(lambda b: sum_over_chunks(fn, b, 4, sequential))(jnp.ones((8, 3)))
  assert seen == [sequential] * len(seen) and len(seen) == (2 if sequential else 4)
  assert direct_conv._AS_FORWARD_CONVS.get() is False


def test_sum_over_chunks_rejects_uneven_leaves():
  with pytest.raises(ValueError, match="divisible by 4"):
    sum_over_chunks(jnp.sum, {"a": jnp.zeros((6, 2)), "b": jnp.zeros((6,))}, 4, True)
  with pytest.raises(ValueError, match="same leading size"):
    sum_over_chunks(jnp.sum, {"a": jnp.zeros((8, 2)), "b": jnp.zeros((4,))}, 4, True)


@pytest.mark.parametrize("sequential", [False, True])
def test_term_chunks_are_uncapped_only_when_rolled(sequential):
  """240 samples of 256^2 in chunks of 2^18 pixels: 60 rolled chunks of 4,
  or (unrolled, capped at MAX_CHUNKS) 16 of 15."""
  assert chunk_cap(sequential) == (None if sequential else MAX_CHUNKS)
  assert chunk_size(240, 256 * 256, 2**18, chunk_cap(sequential)) == (4 if sequential else 15)
