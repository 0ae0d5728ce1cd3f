"""Image-quality metrics, a paired t-test and a denoiser evaluation loop.

* :func:`mse`, :func:`mean_mse` -- mean squared error per image / overall.
* :func:`psnr` -- peak signal-to-noise ratio per image via ``dm_pix.psnr``.
* :func:`ssim` -- structural similarity per image via ``dm_pix.ssim``
  (Gaussian window 11, sigma 1.5, ``k1 = 0.01``, ``k2 = 0.03``).
* :func:`paired_t_test` -- ``scipy.stats.ttest_rel`` on per-image scores of
  two methods evaluated on the same images.
* :func:`evaluate_denoiser` -- runs a denoiser over a fixed validation batch
  in jitted chunks and reports MSE and PSNR.

All image metrics take batches ``(B, H, W, C)`` (or ``(H, W, C)``) and return
one value per image. ``data_range`` is the width of the value range
(``max - min`` allowed value): 1 for images in ``[0, 1]``, 2 for the model
range ``[-1, 1]``.

Example:
  >>> import jax.numpy as jnp
  >>> from mgtrain import metrics
  >>> target = jnp.zeros((2, 16, 16, 3))
  >>> pred = target + jnp.array([0.1, 0.2])[:, None, None, None]
  >>> metrics.mse(pred, target).round(4)
  Array([0.01, 0.04], dtype=float32)
  >>> metrics.psnr(pred, target, data_range=1.0).round(2)
  Array([20.  , 13.98], dtype=float32)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Tuple

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'mse',
    'mean_mse',
    'psnr',
    'ssim',
    'paired_t_test',
    'evaluate_denoiser',
]

Array = jax.Array


def _as_float(x) -> Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  return x


def _check_pair(pred, target) -> Tuple[Array, Array]:
  pred, target = _as_float(pred), _as_float(target)
  if pred.shape != target.shape:
    raise ValueError(
        f'pred and target shapes differ: {pred.shape} vs {target.shape}.')
  return pred, target


def _check_range(data_range) -> None:
  if isinstance(data_range, (int, float)) and not data_range > 0:
    raise ValueError(f'data_range must be positive, got {data_range}.')


def mse(pred, target) -> Array:
  """Mean squared error per sample: mean over all axes but the first.

  Args:
    pred: array of shape ``(B, ...)``.
    target: array of the same shape.

  Returns:
    Array of shape ``(B,)``: ``mean((pred - target)**2)`` over each sample.

  Example:
    >>> import jax.numpy as jnp
    >>> mse(jnp.ones((2, 3, 3, 1)), jnp.zeros((2, 3, 3, 1)))
    Array([1., 1.], dtype=float32)
  """
  pred, target = _check_pair(pred, target)
  if pred.ndim < 1:
    raise ValueError('mse needs a leading batch axis.')
  axes = tuple(range(1, pred.ndim))
  return jnp.mean(jnp.square(pred - target), axis=axes)


def mean_mse(pred, target) -> Array:
  """Mean squared error over the whole batch (mean of :func:`mse`).

  Args:
    pred: array of shape ``(B, ...)``.
    target: array of the same shape.

  Returns:
    Scalar array.

  Example:
    >>> import jax.numpy as jnp
    >>> float(mean_mse(jnp.ones((2, 4)), jnp.zeros((2, 4))))
    1.0
  """
  return jnp.mean(mse(pred, target))


def psnr(pred, target, data_range) -> Array:
  """Peak signal-to-noise ratio per image, in dB, via ``dm_pix.psnr``.

  ``PSNR = 10 log10(data_range**2 / MSE)``. ``dm_pix.psnr`` assumes a value
  range of width 1, so both inputs are divided by ``data_range`` first.
  PSNR is shift invariant, so model-range images (``[-1, 1]``) need only
  ``data_range=2``. Identical images give ``inf``.

  Args:
    pred: images ``(B, H, W, C)`` or ``(H, W, C)``.
    target: images of the same shape.
    data_range: width of the value range (1 for ``[0, 1]``, 2 for
      ``[-1, 1]``, 255 for 8-bit values).

  Returns:
    Array of shape ``(B,)`` (scalar for a single image).

  Example:
    >>> import jax.numpy as jnp
    >>> y = jnp.zeros((1, 8, 8, 3))
    >>> psnr(y + 0.2, y, data_range=2.0).round(3)  # 10 log10(4 / 0.04)
    Array([20.], dtype=float32)
  """
  _check_range(data_range)
  pred, target = _check_pair(pred, target)
  return dm_pix.psnr(pred / data_range, target / data_range)


def ssim(pred, target, data_range) -> Array:
  """Structural similarity per image via ``dm_pix.ssim``.

  Gaussian window of size 11 and sigma 1.5, ``k1 = 0.01``, ``k2 = 0.03``,
  ``'valid'`` filtering, averaged over pixels and channels; this matches
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=data_range,
  channel_axis=-1)``. The constants are ``C1 = (k1 * data_range)**2`` and
  ``C2 = (k2 * data_range)**2``.

  SSIM is *not* shift invariant (its luminance term uses the means), so the
  usual numbers are for images in ``[0, 1]``: convert model-range images
  with :func:`mgtrain.data.patches.from_model_range` and pass
  ``data_range=1``.

  Args:
    pred: images ``(B, H, W, C)`` or ``(H, W, C)`` with ``H, W >= 11``.
    target: images of the same shape.
    data_range: width of the value range.

  Returns:
    Array of shape ``(B,)`` (scalar for a single image), at most 1.

  Example:
    >>> import jax.numpy as jnp
    >>> y = jnp.linspace(0, 1, 2 * 16 * 16 * 3).reshape(2, 16, 16, 3)
    >>> ssim(y, y, data_range=1.0)
    Array([1., 1.], dtype=float32)
  """
  _check_range(data_range)
  pred, target = _check_pair(pred, target)
  if pred.ndim not in (3, 4):
    raise ValueError(
        f'ssim expects (B, H, W, C) or (H, W, C) images, got {pred.shape}.')
  if min(pred.shape[-3], pred.shape[-2]) < 11:
    raise ValueError(
        f'ssim needs images of at least 11x11 pixels, got {pred.shape}.')
  return dm_pix.ssim(pred, target, max_val=data_range, filter_size=11,
                     filter_sigma=1.5)


def paired_t_test(a, b) -> Tuple[float, float]:
  """Paired (dependent-samples) t-test of ``a`` against ``b``.

  ``scipy.stats.ttest_rel`` (two-sided): with ``d = a - b`` over ``n``
  pairs, ``t = mean(d) / (std(d, ddof=1) / sqrt(n))`` with ``n - 1`` degrees
  of freedom. Use it on per-image scores (e.g. PSNR) of two methods on the
  same validation images.

  Args:
    a: 1-D array-like of ``n >= 2`` scores.
    b: 1-D array-like of the same length.

  Returns:
    ``(t_statistic, p_value)`` as Python floats.

  Example:
    >>> t, p = paired_t_test([1.0, 2.0, 3.0, 4.0], [0.9, 1.7, 2.9, 3.5])
    >>> round(t, 3), round(p, 3)
    (2.611, 0.08)
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  a = np.asarray(a, dtype=np.float64).ravel()
  b = np.asarray(b, dtype=np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f'a and b must have the same length: {a.size} vs '
                     f'{b.size}.')
  if a.size < 2:
    raise ValueError(f'A paired t-test needs at least 2 pairs, got {a.size}.')
  result = stats.ttest_rel(a, b)
  return float(result.statistic), float(result.pvalue)


def _eval_chunk_impl(apply_fn, params, u, t, y):
  pred = apply_fn(params, u, t)
  per_mse = mse(pred, y)
  per_psnr = psnr(pred, y, data_range=2.0)
  return per_mse, per_psnr


_eval_chunk = jax.jit(_eval_chunk_impl, static_argnums=0)


def _pad_batch(x: np.ndarray, size: int) -> np.ndarray:
  if x.shape[0] == size:
    return x
  pad = [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
  return np.pad(x, pad, mode='edge')


def evaluate_denoiser(
    apply_fn: Callable[[Any, Array, Array], Array],
    params: Any,
    val_batch: Mapping[str, Any],
    batch_size: int = 64,
) -> Dict[str, Any]:
  """Evaluates a time-conditioned denoiser on a fixed validation batch.

  Runs ``pred = apply_fn(params, u, t)`` on chunks of ``batch_size`` images
  (a ``(B,)`` ``t`` and ``(B, H, W, C)`` ``u``, model range ``[-1, 1]``),
  and compares ``pred`` with ``y`` in model range: per-image MSE and PSNR
  with ``data_range=2``.

  The chunk evaluation is one module-level ``jax.jit`` with ``apply_fn``
  static; the last chunk is padded (by repeating its last image) to the
  chunk size and the padding discarded, so every chunk has the same shape:
  one compilation per (``apply_fn``, chunk shape, params structure), reused
  across calls (e.g. across training evaluations). ``apply_fn`` should
  therefore be hashable and stable across calls (a plain function or a Flax
  ``module.apply``); an unhashable one is jitted afresh on every call. It
  must be deterministic (no dropout) and accept ``(params, u, t)``.

  Args:
    apply_fn: ``(params, u, t) -> prediction`` of the clean images.
    params: the parameters pytree.
    val_batch: mapping with ``'u'`` ``(N, H, W, C)``, ``'t'`` ``(N,)`` and
      ``'y'`` ``(N, H, W, C)``, e.g. from
      :func:`mgtrain.data.tasks.fixed_denoise_set`.
    batch_size: chunk size (``> 0``); the chunk is ``min(batch_size, N)``.

  Returns:
    dict with ``'mse'`` (mean per-image MSE, model range, Python float),
    ``'psnr'`` (mean per-image PSNR in dB, Python float), and the numpy
    arrays ``'per_image_mse'`` and ``'per_image_psnr'`` of shape ``(N,)``
    (e.g. for :func:`paired_t_test`).

  Example:
    >>> import numpy as np
    >>> from mgtrain.data import tasks
    >>> val = tasks.fixed_denoise_set(np.zeros((5, 8, 8, 3), np.float32), 0)
    >>> out = evaluate_denoiser(lambda p, u, t: u, None, val, batch_size=2)
    >>> bool(np.isclose(out['mse'], np.mean((val['u'] - val['y'])**2)))
    True
  """
  if isinstance(batch_size, bool) or not isinstance(
      batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
  missing = [k for k in ('u', 't', 'y') if k not in val_batch]
  if missing:
    raise KeyError(f'val_batch lacks {missing}; it needs "u", "t" and "y".')
  u = np.asarray(val_batch['u'])
  t = np.asarray(val_batch['t'])
  y = np.asarray(val_batch['y'])
  n = u.shape[0]
  if n == 0:
    raise ValueError('val_batch is empty.')
  if y.shape != u.shape or t.shape[:1] != (n,):
    raise ValueError(
        f'Inconsistent val_batch shapes: u {u.shape}, y {y.shape}, t '
        f'{t.shape}.')

  try:
    hash(apply_fn)
    chunk_fn = functools.partial(_eval_chunk, apply_fn)
  except TypeError:
    chunk_fn = jax.jit(functools.partial(_eval_chunk_impl, apply_fn))

  chunk = min(int(batch_size), n)
  per_mse, per_psnr = [], []
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    m, p = chunk_fn(params, _pad_batch(u[start:stop], chunk),
                    _pad_batch(t[start:stop], chunk),
                    _pad_batch(y[start:stop], chunk))
    per_mse.append(np.asarray(m)[:stop - start])
    per_psnr.append(np.asarray(p)[:stop - start])
  per_mse = np.concatenate(per_mse)
  per_psnr = np.concatenate(per_psnr)
  return {
      'mse': float(np.mean(per_mse)),
      'psnr': float(np.mean(per_psnr)),
      'per_image_mse': per_mse,
      'per_image_psnr': per_psnr,
  }

