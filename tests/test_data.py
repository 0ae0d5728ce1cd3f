"""Tests for mgtrain.data: sources, patches and task degradations."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from mgtrain.data import patches as patches_lib
from mgtrain.data import sources
from mgtrain.data import tasks

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'


def _assert_image_list(images, n=None):
  assert isinstance(images, list)
  if n is not None:
    assert len(images) == n
  for im in images:
    assert isinstance(im, np.ndarray)
    assert im.dtype == np.float32
    assert im.ndim == 3 and im.shape[-1] == 3
    assert im.min() >= 0.0 and im.max() <= 1.0


# ---------------------------------------------------------------------------
# Bundled images
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def bundled():
  return sources.bundled_images()


def test_bundled_images_shape_range_and_values(bundled):
  from skimage import data as skdata
  _assert_image_list(bundled, n=len(sources.BUNDLED_COLOR))
  # Independent reference: the raw uint8 arrays of skimage.data.
  np.testing.assert_allclose(bundled[0], skdata.astronaut() / 255.0, atol=1e-6)
  np.testing.assert_allclose(bundled[2], skdata.coffee() / 255.0, atol=1e-6)
  # Genuinely colour, not replicated gray.
  assert not np.allclose(bundled[0][..., 0], bundled[0][..., 1])


def test_bundled_grayscale_is_stacked_and_max_images():
  images = sources.bundled_images(include_grayscale=True)
  n_color = len(sources.BUNDLED_COLOR)
  assert len(images) == n_color + len(sources.BUNDLED_GRAYSCALE)
  gray = images[n_color]  # camera
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  assert len(sources.bundled_images(max_images=3)) == 3
  with pytest.raises(ValueError):
    sources.bundled_images(max_images=0)


# ---------------------------------------------------------------------------
# Folder images
# ---------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (15, 10), dtype=np.uint8)
  rgba = rng.integers(0, 256, (12, 14, 4), dtype=np.uint8)
  # Names chosen so that sorted order differs from creation order.
  Image.fromarray(rgba).save(tmp_path / 'c_rgba.png')
  Image.fromarray(rgb).save(tmp_path / 'a_rgb.PNG')
  Image.fromarray(gray).save(tmp_path / 'b_gray.png')
  (tmp_path / 'notes.txt').write_text('not an image')
  return tmp_path, rgb, gray, rgba


def test_folder_images_modes_and_order(image_folder):
  folder, rgb, gray, rgba = image_folder
  images = sources.folder_images(folder)
  _assert_image_list(images, n=3)
  np.testing.assert_allclose(images[0], rgb / 255.0, atol=1e-6)
  np.testing.assert_allclose(images[1], np.stack([gray] * 3, -1) / 255.0,
                             atol=1e-6)
  np.testing.assert_allclose(images[2], rgba[..., :3] / 255.0, atol=1e-6)
  assert len(sources.folder_images(folder, max_images=2)) == 2
  # Deterministic.
  again = sources.folder_images(str(folder))
  for a, b in zip(images, again):
    np.testing.assert_array_equal(a, b)


def test_folder_images_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    sources.folder_images(tmp_path / 'missing')
  (tmp_path / 'readme.md').write_text('x')
  with pytest.raises(ValueError, match='No image files'):
    sources.folder_images(tmp_path)


def test_folder_images_cbsd68():
  folder = SHARED_DATA / 'CBSD68'
  if not folder.is_dir():
    pytest.skip(f'{folder} not present')
  files = sorted(p for p in folder.iterdir()
                 if p.suffix.lower() in sources.IMAGE_EXTENSIONS)
  images = sources.folder_images(folder)
  _assert_image_list(images, n=len(files))
  with Image.open(files[0]) as img:
    ref = np.asarray(img.convert('RGB'), dtype=np.float32) / 255.0
  np.testing.assert_allclose(images[0], ref, atol=1e-6)


def test_load_images_dispatch(image_folder):
  folder = image_folder[0]
  assert len(sources.load_images('bundled', max_images=2)) == 2
  assert len(sources.load_images('folder', data_dir=folder)) == 3
  with pytest.raises(ValueError, match='data_dir'):
    sources.load_images('folder')


def test_default_data_dir():
  path = sources.default_data_dir()
  assert path.is_absolute() and path.name == 'data'


# ---------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------


def test_tfds_missing_data_raises_clear_error(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as info:
    sources.tfds_images('stl10', data_dir=tmp_path, download=False)
  message = str(info.value)
  assert str(tmp_path) in message
  assert '--download' in message
  assert time.monotonic() - start < 30  # no network retries
  # The dispatcher treats unknown sources as TFDS names.
  with pytest.raises(FileNotFoundError, match='--download'):
    sources.load_images('stl10', data_dir=tmp_path)


def test_unknown_dataset_name_is_one_short_error(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_set': not 'bundled'") as info:
    sources.load_images('no_such_set', data_dir=tmp_path)
  assert len(str(info.value)) < 300   # not tfds's list of every dataset


def test_tfds_mock_data_source():
  tfds = pytest.importorskip('tensorflow_datasets')
  try:
    with tfds.testing.mock_data(num_examples=4):
      images = sources.tfds_images('stl10', split='train')
      few = sources.tfds_images('stl10', split='train', max_images=2)
      raw = tfds.data_source('stl10', split='train')[0]['image']
  except (ImportError, NotImplementedError) as e:  # pragma: no cover
    pytest.skip(f'tfds mock_data with data_source unavailable: {e}')
  _assert_image_list(images, n=4)
  assert images[0].shape == (96, 96, 3)
  assert len(few) == 2
  np.testing.assert_allclose(images[0], np.asarray(raw) / 255.0, atol=1e-6)


# ---------------------------------------------------------------------------
# Train / validation split
# ---------------------------------------------------------------------------


def test_train_val_split():
  items = list(range(10))
  train, val = sources.train_val_split(items, val_fraction=0.2)
  assert train == list(range(8)) and val == [8, 9]
  train, val = sources.train_val_split(items[:2])
  assert train == [0] and val == [1]
  train, val = sources.train_val_split(items, val_fraction=0.0, min_val=3)
  assert len(val) == 3 and train + val == items
  with pytest.raises(ValueError, match='at least 2'):
    sources.train_val_split(items[:1])
  with pytest.raises(ValueError):
    sources.train_val_split(items, val_fraction=1.0)


# ---------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------


def _symmetries(image):
  out = []
  for flipped in (image, image[:, ::-1]):
    for k in range(4):
      out.append(np.rot90(flipped, k, axes=(0, 1)))
  return out


def _is_window_of(patch, image):
  size = patch.shape[0]
  for sym in _symmetries(patch):
    for y in range(image.shape[0] - size + 1):
      for x in range(image.shape[1] - size + 1):
        if np.array_equal(sym, image[y:y + size, x:x + size]):
          return True
  return False


def test_extract_patches_shapes_and_determinism():
  rng = np.random.default_rng(0)
  images = [rng.random((20, 25, 3), dtype=np.float32),
            rng.random((30, 18, 3), dtype=np.float32)]
  a = patches_lib.extract_patches(images, size=8, count=10, seed=3)
  b = patches_lib.extract_patches(images, size=8, count=10, seed=3)
  c = patches_lib.extract_patches(images, size=8, count=10, seed=4)
  assert a.shape == (10, 8, 8, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_extract_patches_are_augmented_windows():
  rng = np.random.default_rng(1)
  image = rng.random((10, 11, 3), dtype=np.float32)
  out = patches_lib.extract_patches([image], size=4, count=12, seed=0)
  for patch in out:
    assert _is_window_of(patch, image)


def test_extract_patches_area_proportional():
  small = np.zeros((10, 10, 3), np.float32)  # area 100
  large = np.ones((20, 20, 3), np.float32)  # area 400
  out = patches_lib.extract_patches([small, large], size=4, count=4000,
                                    seed=0)
  frac_large = out[:, 0, 0, 0].mean()
  assert abs(frac_large - 0.8) < 0.03


def test_extract_patches_upscales_small_images_with_warning():
  image = np.random.default_rng(0).random((6, 12, 3), dtype=np.float32)
  with pytest.warns(UserWarning, match='upscaling'):
    out = patches_lib.extract_patches([image], size=8, count=5, seed=0)
  assert out.shape == (5, 8, 8, 3)
  assert out.min() >= 0.0 and out.max() <= 1.0


def test_extract_patches_errors():
  image = np.zeros((8, 8, 3), np.float32)
  with pytest.raises(ValueError, match='size'):
    patches_lib.extract_patches([image], size=0, count=1, seed=0)
  with pytest.raises(ValueError, match='count'):
    patches_lib.extract_patches([image], size=4, count=0, seed=0)
  with pytest.raises(ValueError, match='at least one image'):
    patches_lib.extract_patches([], size=4, count=1, seed=0)
  with pytest.raises(ValueError, match=r'\(H, W, 3\)'):
    patches_lib.extract_patches([np.zeros((8, 8))], size=4, count=1, seed=0)


def test_model_range_round_trip():
  x = np.array([0.0, 0.25, 1.0], np.float32)
  np.testing.assert_allclose(patches_lib.to_model_range(x), [-1.0, -0.5, 1.0])
  np.testing.assert_allclose(
      patches_lib.from_model_range(patches_lib.to_model_range(x)), x)


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------


# The task tests share one image shape so that ``denoise`` (itself jitted)
# compiles once per call signature: compiling jax.random.normal takes seconds
# on a small CPU.
SHAPE = (4, 8, 8, 3)


def test_denoise_t_one_is_clean_and_t_zero_is_noise():
  key = jax.random.key(0)
  y = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, SHAPE),
                  jnp.float32)
  out = tasks.denoise(key, y, t=jnp.ones(SHAPE[0]))
  np.testing.assert_array_equal(out['u'], y)
  np.testing.assert_array_equal(out['y'], y)
  # Same key, different clean image: t = 0 gives the same pure noise.
  noise = tasks.denoise(key, y, t=jnp.zeros(SHAPE[0]))['u']
  noise2 = tasks.denoise(key, -y, t=jnp.zeros(SHAPE[0]))['u']
  np.testing.assert_array_equal(noise, noise2)
  assert not np.allclose(noise, y)


def test_denoise_is_affine_mix_with_sampled_t():
  key = jax.random.key(2)
  y = jnp.zeros(SHAPE)
  out0 = tasks.denoise(key, y)
  out1 = tasks.denoise(key, y + 1.0)
  t = out0['t']
  assert t.shape == (SHAPE[0],)
  np.testing.assert_array_equal(t, out1['t'])
  # u(y + 1) - u(y) = t * 1, per sample.
  diff = np.asarray(out1['u'] - out0['u'])
  np.testing.assert_allclose(diff, np.broadcast_to(
      np.asarray(t)[:, None, None, None], diff.shape), atol=1e-6)


def test_denoise_statistics():
  # y = 0 gives u = (1 - t) z: recover z and check N(0, 1), t ~ U[0, 1].
  out = tasks.denoise(jax.random.key(3), jnp.zeros((4096, 4, 4, 3)))
  t = np.asarray(out['t'], np.float64)
  z = np.asarray(out['u'], np.float64) / (1.0 - t)[:, None, None, None]
  assert abs(z.mean()) < 0.01
  assert abs(z.std() - 1.0) < 0.01
  assert abs(stats.kurtosis(z.ravel())) < 0.05  # Gaussian: excess kurtosis 0
  assert t.min() >= 0.0 and t.max() <= 1.0
  assert abs(t.mean() - 0.5) < 0.02
  assert abs(t.var() - 1.0 / 12.0) < 0.005


def test_denoise_vmap_matches_per_key_calls():
  y = jnp.zeros(SHAPE)
  keys = jax.random.split(jax.random.key(5), 2)
  batched = jax.vmap(tasks.denoise, in_axes=(0, None))(keys, y)
  assert batched['u'].shape == (2,) + SHAPE
  assert batched['t'].shape == (2, SHAPE[0])
  single = tasks.denoise(keys[1], y)
  for k in ('u', 'y', 't'):
    np.testing.assert_allclose(batched[k][1], single[k], atol=1e-6)


def test_fixed_denoise_set_is_deterministic():
  y = np.zeros(SHAPE, np.float32)
  a = tasks.fixed_denoise_set(y, seed=0)
  b = tasks.fixed_denoise_set(y, seed=0)
  c = tasks.fixed_denoise_set(y, seed=1)
  assert set(a) == {'u', 'y', 't'}
  for k in a:
    assert isinstance(a[k], np.ndarray)
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a['u'], c['u'])
  assert a['u'].shape == y.shape and a['t'].shape == (4,)


def test_task_registry():
  assert tasks.TASKS['denoise'] is tasks.denoise


def test_extract_patches_scales_integer_images_and_refuses_floats_on_another_scale():
  """A uint8 photograph (skimage.io.imread's) gives the same patches as its
  floats in [0, 1]; the same values as floats in [0, 255], or in the model
  range, are refused instead of giving patches on the wrong scale."""
  rng = np.random.default_rng(2)
  image8 = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  unit = image8.astype(np.float32) / 255
  np.testing.assert_allclose(patches_lib.extract_patches([image8], 8, 6, seed=0),
                             patches_lib.extract_patches([unit], 8, 6, seed=0), rtol=1e-6)
  image16 = image8.astype(np.uint16) * 257   # the same picture, 16 bits
  np.testing.assert_allclose(patches_lib.extract_patches([image16], 8, 6, seed=0),
                             patches_lib.extract_patches([unit], 8, 6, seed=0), rtol=1e-6)
  for bad in (image8.astype(np.float32), patches_lib.to_model_range(unit)):
    with pytest.raises(ValueError, match=r'Image 1 has values in .*\[0, 1\]'):
      patches_lib.extract_patches([unit, bad], 8, 6, seed=0)
  # Rounding just past 1 (a resize) is clipped, not refused.
  out = patches_lib.extract_patches([np.minimum(unit * 1.0005, 1.0005)], 8, 6, seed=0)
  assert out.max() <= 1.0
