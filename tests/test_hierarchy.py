import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgtrain.hierarchy import (CoarseMeshWarning, Hierarchy, HierarchyError, coarsen,
                               levels_for_stage)

pytestmark = pytest.mark.filterwarnings(
    "ignore::mgtrain.hierarchy.CoarseMeshWarning")


@pytest.mark.parametrize("restriction", ["average", "bilinear"])
def test_restriction_preserves_mean(restriction):
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 2))
  h = Hierarchy(levels=4, size=32, restriction=restriction)
  for steps in range(4):
    y = h.restrict({"x": x}, steps)["x"]
    assert y.shape == (3, 32 // 2**steps, 32 // 2**steps, 2)
    np.testing.assert_allclose(y.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-5)


def test_average_restriction_is_block_mean():
  x = np.random.default_rng(0).normal(size=(2, 8, 6, 3)).astype(np.float32)
  ref = np.zeros((2, 4, 3, 3), np.float32)
  for i in range(4):
    for j in range(3):
      ref[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2))
  np.testing.assert_allclose(coarsen(jnp.asarray(x), "average"), ref, rtol=1e-6, atol=1e-6)
  # For an exact factor of 2, bilinear without antialiasing samples block centres.
  np.testing.assert_allclose(coarsen(jnp.asarray(x), "bilinear"), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(coarsen(jnp.asarray(x), "nearest"), x[:, ::2, ::2])


def test_non_image_leaves_pass_through():
  h = Hierarchy(levels=3, size=16)
  batch = {"u": jnp.ones((2, 16, 16, 3)), "t": jnp.array([0.1, 0.7])}
  out = h.restrict(batch, 2)
  assert out["u"].shape == (2, 4, 4, 3)
  np.testing.assert_array_equal(out["t"], batch["t"])


@pytest.mark.parametrize("restriction", ["average", "bilinear", "nearest"])
def test_label_images_are_restricted_by_nearest(restriction):
  """Integer and boolean images (label maps, masks) keep their values and
  dtype on every level, whatever restriction the real-valued images use."""
  rng = np.random.default_rng(0)
  labels = jnp.asarray(rng.integers(0, 5, size=(2, 16, 16, 1)), jnp.int32)
  mask = jnp.asarray(rng.random((2, 16, 16, 1)) < 0.5)
  image = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  h = Hierarchy(levels=3, size=16, restriction=restriction)
  out = h.restrict({"labels": labels, "mask": mask, "image": image}, 2)
  np.testing.assert_array_equal(out["labels"], labels[:, ::4, ::4])
  np.testing.assert_array_equal(out["mask"], mask[:, ::4, ::4])
  assert out["labels"].dtype == jnp.int32 and out["mask"].dtype == jnp.bool_
  np.testing.assert_allclose(out["image"], coarsen(coarsen(image, restriction), restriction))


@pytest.mark.parametrize("restriction", ["average", "bilinear"])
def test_coarsen_refuses_to_average_labels(restriction):
  with pytest.raises(HierarchyError, match="use 'nearest'"):
    coarsen(jnp.zeros((1, 4, 4, 1), jnp.int32), restriction)


def test_crop_keeps_mesh_and_aligns_leaves():
  h = Hierarchy(levels=3, size=16, subsample="crop")
  x = jnp.arange(2 * 16 * 16, dtype=jnp.float32).reshape(2, 16, 16, 1)
  out = h.restrict({"u": x, "y": x + 1.0}, 2, jax.random.key(3))
  assert out["u"].shape == (2, 4, 4, 1)
  np.testing.assert_array_equal(out["y"] - out["u"], 1.0)
  # A crop is a contiguous window of the original (pixel spacing unchanged).
  np.testing.assert_array_equal(jnp.diff(out["u"][..., 0], axis=2), 1.0)
  with pytest.raises(HierarchyError, match="PRNG key"):
    h.restrict({"u": x}, 1)


def test_coarsen_plus_crop_sizes():
  h = Hierarchy(levels=4, size=32, subsample="coarsen+crop")
  x = jnp.ones((1, 32, 32, 3))
  for steps in range(4):
    assert h.restrict({"u": x}, steps, jax.random.key(0))["u"].shape[1] == 32 // 2**steps


def test_sizes_batches_and_stage_levels():
  h = Hierarchy(levels=4, size=64, base_batch=16)
  assert h.sizes == (64, 32, 16, 8)
  assert h.batch_sizes == (16, 32, 64, 128)
  assert h.total_batch == 240
  assert h.cost(2) == 1 / 16
  assert Hierarchy(levels=3, size=16, batch_sizes=(1, 5, 7)).batch_sizes == (1, 5, 7)
  assert [levels_for_stage(4, s) for s in range(4)] == [
      (3,), (2, 3), (1, 2, 3), (0, 1, 2, 3)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(levels=4, size=60), "not divisible by 2\\^\\(L-1\\) = 8"),
    (dict(levels=0, size=64), "levels must be a positive integer"),
    (dict(levels=2, size=64, base_batch=0), "base_batch must be a positive"),
    (dict(levels=2, size=64, base_batch=-3), "base_batch must be a positive"),
    (dict(levels=2, size=64, batch_sizes=(4, 0)), "batch size of level 1"),
    (dict(levels=3, size=64, batch_sizes=(4, 8)), "has 2 entries but the hierarchy has 3"),
    (dict(levels=2, size=64, subsample="zoom"), "subsample must be one of"),
    (dict(levels=2, size=64, restriction="cubic"), "restriction must be one of"),
])
def test_invalid_hierarchies_raise(kwargs, match):
  with pytest.raises(HierarchyError, match=match):
    Hierarchy(**kwargs)


def test_schedule_length_must_match_levels():
  h = Hierarchy(levels=4, size=64)
  assert h.check_schedule([8, 4, 2, 1]) == (8, 4, 2, 1)
  with pytest.raises(HierarchyError, match="has 3 entries but the hierarchy has 4"):
    h.check_schedule([8, 4, 2])
  with pytest.raises(HierarchyError, match="must be a positive integer"):
    h.check_schedule([8, 4, 0, 1])


def test_coarse_mesh_warns():
  with pytest.warns(CoarseMeshWarning, match="4x4"):
    Hierarchy(levels=4, size=32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    Hierarchy(levels=4, size=64)
