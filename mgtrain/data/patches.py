"""Random square training patches and the model's value range.

:func:`extract_patches` turns a list of images of any size (as returned by
:mod:`mgtrain.data.sources`) into one ``(count, size, size, 3)`` array of
random, augmented square patches. :func:`to_model_range` and
:func:`from_model_range` map between image values in ``[0, 1]`` and the
``[-1, 1]`` range the models work in.

Example:
  >>> import numpy as np
  >>> from mgtrain.data import patches, sources
  >>> images = sources.bundled_images(max_images=2)
  >>> x = patches.extract_patches(images, size=64, count=16, seed=0)
  >>> x.shape, x.dtype
  ((16, 64, 64, 3), dtype('float32'))
  >>> y = patches.to_model_range(x)   # what the model is trained on
  >>> bool(y.min() >= -1 and y.max() <= 1)
  True
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from mgtrain.data.sources import as_float_rgb

__all__ = ['extract_patches', 'to_model_range', 'from_model_range']


def _upscale_if_small(image: np.ndarray, size: int, index: int) -> np.ndarray:
  """Upscales ``image`` (aspect ratio kept) so that both sides are >= size."""
  h, w = image.shape[:2]
  if h >= size and w >= size:
    return image
  from skimage.transform import resize  # pylint: disable=g-import-not-at-top

  scale = size / min(h, w)
  new_h = max(size, int(np.ceil(h * scale)))
  new_w = max(size, int(np.ceil(w * scale)))
  warnings.warn(
      f'Image {index} of shape {h}x{w} is smaller than the patch size {size}; '
      f'upscaling it (bilinear) to {new_h}x{new_w}.', stacklevel=3)
  out = resize(image, (new_h, new_w), order=1, mode='edge',
               anti_aliasing=False, preserve_range=True)
  return np.clip(out, 0.0, 1.0).astype(np.float32)


# Float images may overshoot [0, 1] by rounding (a resize, a colour
# conversion); beyond this they are on another scale.
_RANGE_SLACK = 1e-3


def _unit_range_rgb(image, index: int) -> np.ndarray:
  """``image`` as ``float32`` ``(H, W, 3)`` in ``[0, 1]``: integer and boolean
  images scaled as :func:`mgtrain.data.sources.as_float_rgb` does, float
  images checked, not rescaled."""
  arr = np.asarray(image)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(
        f'Image {index} must have shape (H, W, 3), got {arr.shape}.')
  if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
    return as_float_rgb(arr)
  arr = arr.astype(np.float32)
  lo, hi = float(arr.min()), float(arr.max())
  if not (lo >= -_RANGE_SLACK and hi <= 1 + _RANGE_SLACK):
    raise ValueError(
        f'Image {index} has values in [{lo:.4g}, {hi:.4g}]; extract_patches takes '
        'float images in [0, 1] (an 8-bit image as floats: divide by 255, or pass '
        'the uint8 array, which is scaled).')
  return np.clip(arr, 0.0, 1.0)


def extract_patches(
    images: Sequence[np.ndarray],
    size: int,
    count: int,
    seed: int,
) -> np.ndarray:
  """Draws random, augmented square patches from a list of images.

  For each patch, independently:

  1. an image is chosen with probability proportional to its area
     ``H * W`` (so every pixel of the collection is equally likely to be a
     patch's top-left corner, up to border effects);
  2. a uniformly random ``size x size`` window inside it is cut out;
  3. the window is flipped horizontally with probability 1/2 and rotated by
     ``k * 90`` degrees with ``k`` uniform in ``{0, 1, 2, 3}`` (the 8
     symmetries of the square, each with probability 1/8).

  Images with a side shorter than ``size`` are first upscaled bilinearly
  (aspect ratio kept, ``skimage.transform.resize``) with a warning; their
  area after upscaling is used in step 1.

  Integer images (what ``skimage.io.imread`` gives) are scaled to ``[0, 1]``
  by their type's maximum, as :func:`mgtrain.data.sources.as_float_rgb`
  does: a ``uint8`` image by 255. Float images must already be in
  ``[0, 1]``; one on another scale (``[0, 255]`` floats, the model range
  ``[-1, 1]``) is refused, since its patches would silently train on the
  wrong range.

  The result depends only on the inputs and ``seed`` (numpy ``Generator``).

  Args:
    images: sequence of arrays of shape ``(H_i, W_i, 3)``: floats in
      ``[0, 1]``, or integers (sizes may differ).
    size: side of the square patches, ``> 0``.
    count: number of patches, ``> 0``.
    seed: seed of ``np.random.default_rng``.

  Returns:
    ``float32`` array of shape ``(count, size, size, 3)``, values in
    ``[0, 1]`` if the images are.

  Raises:
    ValueError: ``size <= 0``, ``count <= 0``, no images, an image that
      is not ``(H, W, 3)``, or a float image with values outside ``[0, 1]``.

  Example:
    >>> import numpy as np
    >>> img = np.random.default_rng(0).random((40, 50, 3), dtype=np.float32)
    >>> p = extract_patches([img], size=16, count=4, seed=1)
    >>> p.shape
    (4, 16, 16, 3)
    >>> bool(np.array_equal(p, extract_patches([img], 16, 4, seed=1)))
    True
  """
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
    raise TypeError(f'size must be an int, got {size!r}.')
  if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
    raise TypeError(f'count must be an int, got {count!r}.')
  if size <= 0:
    raise ValueError(f'Patch size must be positive, got {size}.')
  if count <= 0:
    raise ValueError(f'Patch count must be positive, got {count}.')
  images = list(images)
  if not images:
    raise ValueError('extract_patches needs at least one image, got none.')
  size, count = int(size), int(count)

  prepared = [_upscale_if_small(_unit_range_rgb(image, i), size, i)
              for i, image in enumerate(images)]

  areas = np.array([im.shape[0] * im.shape[1] for im in prepared],
                   dtype=np.float64)
  rng = np.random.default_rng(seed)
  which = rng.choice(len(prepared), size=count, p=areas / areas.sum())
  # Uniform positions: floor(U * (n_positions)) per patch, vectorised.
  max_y = np.array([prepared[j].shape[0] - size + 1 for j in which])
  max_x = np.array([prepared[j].shape[1] - size + 1 for j in which])
  ys = np.floor(rng.random(count) * max_y).astype(np.int64)
  xs = np.floor(rng.random(count) * max_x).astype(np.int64)
  flips = rng.random(count) < 0.5
  rotations = rng.integers(0, 4, size=count)

  out = np.empty((count, size, size, 3), dtype=np.float32)
  for n in range(count):
    patch = prepared[which[n]][ys[n]:ys[n] + size, xs[n]:xs[n] + size]
    if flips[n]:
      patch = patch[:, ::-1]
    out[n] = np.rot90(patch, k=int(rotations[n]), axes=(0, 1))
  return out


def to_model_range(x):
  """Maps image values from ``[0, 1]`` to the model range ``[-1, 1]``.

  The models (as in diffusion-model code, and the MGE reference code) work on
  images in ``[-1, 1]``: ``to_model_range(x) = 2 x - 1``. Pure arithmetic, so
  it works on numpy and jax arrays of any shape, under ``jit`` too. Note that
  an error in model range is twice the error in ``[0, 1]``: MSE is 4x and
  PSNR must use ``data_range=2``.

  Args:
    x: array with values in ``[0, 1]``.

  Returns:
    ``2 * x - 1``, same shape and type.

  Example:
    >>> to_model_range(np.array([0.0, 0.5, 1.0]))
    array([-1.,  0.,  1.])
  """
  return 2.0 * x - 1.0


def from_model_range(x):
  """Maps model-range values ``[-1, 1]`` back to image values ``[0, 1]``.

  The inverse of :func:`to_model_range`: ``(x + 1) / 2``. No clipping:
  clip the result yourself before saving network outputs as images.

  Args:
    x: array with values in ``[-1, 1]``.

  Returns:
    ``(x + 1) / 2``, same shape and type.

  Example:
    >>> from_model_range(np.array([-1.0, 0.0, 1.0]))
    array([0. , 0.5, 1. ])
  """
  return (x + 1.0) * 0.5
