"""Tests for mgtrain.metrics against independent references."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mgtrain import metrics
from mgtrain.data import tasks


def _pair(seed=0, shape=(3, 16, 16, 3), low=0.0, high=1.0):
  rng = np.random.default_rng(seed)
  target = rng.uniform(low, high, shape).astype(np.float32)
  pred = np.clip(target + 0.1 * rng.standard_normal(shape), low,
                 high).astype(np.float32)
  return pred, target


def test_mse_matches_numpy():
  pred, target = _pair()
  expected = ((pred - target) ** 2).reshape(3, -1).mean(axis=1)
  np.testing.assert_allclose(metrics.mse(pred, target), expected, rtol=1e-5)
  np.testing.assert_allclose(metrics.mean_mse(pred, target), expected.mean(),
                             rtol=1e-5)
  with pytest.raises(ValueError, match='shapes differ'):
    metrics.mse(pred, target[:2])


@pytest.mark.parametrize('data_range,low,high', [(1.0, 0.0, 1.0),
                                                  (2.0, -1.0, 1.0),
                                                  (255.0, 0.0, 255.0)])
def test_psnr_matches_hand_formula(data_range, low, high):
  pred, target = _pair(seed=1, low=low, high=high)
  per_mse = ((pred.astype(np.float64) - target) ** 2).reshape(3, -1).mean(1)
  expected = 10.0 * np.log10(data_range ** 2 / per_mse)
  got = metrics.psnr(jnp.asarray(pred), jnp.asarray(target), data_range)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_ssim_identical_is_one_and_matches_skimage():
  from skimage.metrics import structural_similarity
  pred, target = _pair(seed=2, shape=(2, 24, 24, 3))
  same = metrics.ssim(target, target, data_range=1.0)
  np.testing.assert_allclose(same, np.ones(2), atol=1e-5)
  got = metrics.ssim(pred, target, data_range=1.0)
  assert got.shape == (2,)
  expected = [
      structural_similarity(p, t, data_range=1.0, channel_axis=-1,
                            gaussian_weights=True, sigma=1.5,
                            use_sample_covariance=False)
      for p, t in zip(pred, target)
  ]
  np.testing.assert_allclose(got, expected, atol=1e-4)
  assert np.all(np.asarray(got) < 1.0)
  with pytest.raises(ValueError, match='11x11'):
    metrics.ssim(pred[:, :8, :8], target[:, :8, :8], data_range=1.0)


def test_paired_t_test_matches_scipy_and_formula():
  a = np.array([30.1, 28.4, 31.2, 29.9, 27.5, 30.6])
  b = np.array([29.8, 28.5, 30.7, 29.1, 27.0, 30.2])
  t, p = metrics.paired_t_test(a, b)
  ref = stats.ttest_rel(a, b)
  assert isinstance(t, float) and isinstance(p, float)
  assert t == pytest.approx(ref.statistic)
  assert p == pytest.approx(ref.pvalue)
  d = a - b
  assert t == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(d.size)))
  with pytest.raises(ValueError):
    metrics.paired_t_test(a, b[:3])


def _scaled_identity(params, u, t):
  del t
  return params['scale'] * u


def _time_only(params, u, t):
  del params
  return jnp.broadcast_to(t[:, None, None, None], u.shape)


def test_evaluate_denoiser_identity_matches_hand_computation():
  rng = np.random.default_rng(3)
  y = rng.uniform(-1, 1, (7, 8, 8, 3)).astype(np.float32)
  val = tasks.fixed_denoise_set(y, seed=0)
  out = metrics.evaluate_denoiser(_scaled_identity, {'scale': 1.0}, val,
                                  batch_size=3)
  per_mse = ((val['u'].astype(np.float64) - val['y']) ** 2).reshape(7, -1)
  per_mse = per_mse.mean(axis=1)
  assert isinstance(out['mse'], float) and isinstance(out['psnr'], float)
  assert out['per_image_mse'].shape == (7,)
  np.testing.assert_allclose(out['per_image_mse'], per_mse, rtol=1e-5)
  assert out['mse'] == pytest.approx(per_mse.mean(), rel=1e-5)
  assert out['psnr'] == pytest.approx(
      np.mean(10 * np.log10(4.0 / per_mse)), rel=1e-5)


def test_evaluate_denoiser_chunks_keep_order_and_do_not_recompile():
  n = 5
  t = np.linspace(0.1, 0.9, n).astype(np.float32)
  val = {'u': np.zeros((n, 4, 4, 3), np.float32), 't': t,
         'y': np.zeros((n, 4, 4, 3), np.float32)}
  out = metrics.evaluate_denoiser(_time_only, None, val, batch_size=2)
  np.testing.assert_allclose(out['per_image_mse'], t ** 2, rtol=1e-6)

  metrics.evaluate_denoiser(_scaled_identity, {'scale': 1.0}, val,
                            batch_size=2)
  size = metrics._eval_chunk._cache_size()  # pylint: disable=protected-access
  metrics.evaluate_denoiser(_scaled_identity, {'scale': 0.5}, val,
                            batch_size=2)
  assert metrics._eval_chunk._cache_size() == size  # pylint: disable=protected-access


def test_evaluate_denoiser_validates_input():
  with pytest.raises(KeyError):
    metrics.evaluate_denoiser(_time_only, None, {'u': np.zeros((1, 4, 4, 3))})
  with pytest.raises(ValueError):
    metrics.evaluate_denoiser(_time_only, None, {}, batch_size=0)
