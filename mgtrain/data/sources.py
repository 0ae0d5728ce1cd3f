"""Image sources: bundled photographs, image folders and TFDS datasets.

Every source returns the same thing: a Python ``list`` of ``float32`` numpy
arrays of shape ``(H, W, 3)`` with values in ``[0, 1]``. Sizes may differ from
image to image; :func:`mgtrain.data.patches.extract_patches` turns such a list
into a fixed-size training array. Grayscale images are stacked to three
channels and alpha channels are dropped, so downstream code can always assume
RGB.

Sources:

* :func:`bundled_images` -- colour photographs shipped inside scikit-image.
  They are read from the installed package and never need the internet, so
  they are the default for smoke tests and examples.
* :func:`folder_images` -- every png/jpg/jpeg/bmp/tif(f) file of a folder,
  sorted by file name (deterministic), e.g. CBSD68.
* :func:`tfds_images` -- the ``image`` feature of a TensorFlow Datasets
  dataset (``stl10``, ``celeb_a``, ...) read through ``tfds.data_source``,
  which needs no TensorFlow. ``tensorflow_datasets`` is imported only inside
  that function, so it stays an optional dependency.

:func:`load_images` dispatches on a source string (as used by the experiment
CLIs) and :func:`train_val_split` splits a list of images by image.

Example:
  >>> from mgtrain.data import sources
  >>> images = sources.load_images('bundled', max_images=2)
  >>> [im.shape for im in images]
  [(512, 512, 3), (300, 451, 3)]
  >>> train, val = sources.train_val_split(images, val_fraction=0.5)
  >>> len(train), len(val)
  (1, 1)
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

__all__ = [
    'IMAGE_EXTENSIONS',
    'BUNDLED_COLOR',
    'BUNDLED_GRAYSCALE',
    'as_float_rgb',
    'bundled_images',
    'default_data_dir',
    'folder_images',
    'tfds_images',
    'load_images',
    'train_val_split',
]

PathLike = Union[str, os.PathLike]

#: File extensions (lower case) that :func:`folder_images` reads.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')

#: Colour photographs of ``skimage.data`` that ship inside the scikit-image
#: wheel (no download). ``cat`` is the same picture as ``chelsea`` and is
#: therefore left out; ``stereo_motorcycle`` contributes its left view.
BUNDLED_COLOR = (
    'astronaut',
    'chelsea',
    'coffee',
    'rocket',
    'immunohistochemistry',
    'hubble_deep_field',
    'retina',
    'stereo_motorcycle',
)

#: Grayscale photographs of ``skimage.data`` that ship inside the wheel; used
#: by ``bundled_images(include_grayscale=True)`` (stacked to 3 channels).
BUNDLED_GRAYSCALE = (
    'camera',
    'moon',
    'coins',
    'grass',
    'gravel',
    'brick',
    'clock',
)


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


def as_float_rgb(image: np.ndarray) -> np.ndarray:
  """Converts an image array to ``float32`` RGB in ``[0, 1]``.

  Args:
    image: ``(H, W)``, ``(H, W, 1)`` (gray), ``(H, W, 2)`` (gray + alpha),
      ``(H, W, 3)`` (RGB) or ``(H, W, 4)`` (RGBA). Integer images are scaled
      by the maximum of their type (``uint8`` by 255, ``uint16`` by 65535;
      other integer types by 255 if their maximum is at most 255, else by
      65535). Boolean images map to {0, 1}. Float images are taken to be in
      ``[0, 1]`` already and are clipped to it.

  Returns:
    ``float32`` array of shape ``(H, W, 3)`` with values in ``[0, 1]``; the
    alpha channel, if any, is dropped and gray is repeated to 3 channels.

  Example:
    >>> as_float_rgb(np.full((2, 3), 255, np.uint8)).shape
    (2, 3, 3)
  """
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(
        'Expected an image of shape (H, W) or (H, W, C) with C in 1..4, got '
        f'shape {arr.shape}.')
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f'Empty image of shape {arr.shape}.')
  channels = arr.shape[-1]
  if channels == 2:  # gray + alpha
    arr = arr[..., :1]
  elif channels == 4:  # RGBA
    arr = arr[..., :3]

  if arr.dtype == np.bool_:
    out = arr.astype(np.float32)
  elif arr.dtype == np.uint8:
    out = arr.astype(np.float32) / 255.0
  elif arr.dtype == np.uint16:
    out = arr.astype(np.float32) / 65535.0
  elif np.issubdtype(arr.dtype, np.integer):
    scale = 255.0 if arr.max() <= 255 else 65535.0
    out = np.clip(arr.astype(np.float32) / scale, 0.0, 1.0)
  elif np.issubdtype(arr.dtype, np.floating):
    out = np.clip(arr.astype(np.float32), 0.0, 1.0)
  else:
    raise ValueError(f'Unsupported image dtype {arr.dtype}.')

  if out.shape[-1] == 1:
    out = np.repeat(out, 3, axis=-1)
  return np.ascontiguousarray(out, dtype=np.float32)


def _check_max_images(max_images: Optional[int]) -> Optional[int]:
  if max_images is None:
    return None
  if isinstance(max_images, bool) or not isinstance(
      max_images, (int, np.integer)):
    raise TypeError(f'max_images must be an int or None, got {max_images!r}.')
  if max_images <= 0:
    raise ValueError(f'max_images must be positive, got {max_images}.')
  return int(max_images)


# ---------------------------------------------------------------------------
# Bundled images
# ---------------------------------------------------------------------------


def _load_skimage(name: str) -> np.ndarray:
  from skimage import data as skdata  # pylint: disable=g-import-not-at-top

  loader: Callable[[], object] = getattr(skdata, name)
  out = loader()
  if name == 'stereo_motorcycle':  # (left, right, disparity)
    out = out[0]
  return np.asarray(out)


def bundled_images(
    include_grayscale: bool = False,
    max_images: Optional[int] = None,
) -> list[np.ndarray]:
  """Photographs that ship with scikit-image; never needs the internet.

  The colour set is :data:`BUNDLED_COLOR`: astronaut (512x512), chelsea
  (300x451), coffee (400x600), rocket (427x640), immunohistochemistry
  (512x512), hubble_deep_field (872x1000), retina (1411x1411) and the left view
  of stereo_motorcycle (500x741). With ``include_grayscale=True`` the
  grayscale photographs of :data:`BUNDLED_GRAYSCALE` (camera, moon, coins,
  grass, gravel, brick, clock) follow, stacked to three channels.

  All of them are files inside the installed scikit-image package (they are
  not fetched with pooch), so this works offline.

  Args:
    include_grayscale: also return the grayscale photographs.
    max_images: keep only the first ``max_images`` images (in the order
      above); ``None`` keeps all.

  Returns:
    List of ``float32`` arrays of shape ``(H, W, 3)`` in ``[0, 1]``.

  Example:
    >>> images = bundled_images()
    >>> len(images), images[0].shape, images[0].dtype
    (8, (512, 512, 3), dtype('float32'))
  """
  max_images = _check_max_images(max_images)
  names = list(BUNDLED_COLOR)
  if include_grayscale:
    names += list(BUNDLED_GRAYSCALE)
  if max_images is not None:
    names = names[:max_images]
  return [as_float_rgb(_load_skimage(name)) for name in names]


# ---------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------


def default_data_dir() -> Path:
  """The default folder holding image datasets (CBSD68, CSet14, ...).

  ``$MGTRAIN_DATA_DIR`` if set, otherwise ``<repository>/../shared/data``
  (the folder next to the repository checkout). The folder may not exist;
  callers check.

  Returns:
    An absolute :class:`pathlib.Path`.

  Example:
    >>> default_data_dir().name
    'data'
  """
  env = os.environ.get('MGTRAIN_DATA_DIR')
  if env:
    return Path(env).expanduser().resolve()
  # sources.py -> data/ -> mgtrain/ -> repository root
  repo_root = Path(__file__).resolve().parents[2]
  return repo_root.parent / 'shared' / 'data'


def _read_image_file(path: Path) -> np.ndarray:
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top

  with Image.open(path) as img:
    img.seek(0)  # first frame of multi-page files
    img = ImageOps.exif_transpose(img)
    if img.mode in ('P', 'PA'):
      img = img.convert('RGBA')
    elif img.mode in ('CMYK', 'YCbCr', 'LAB', 'HSV'):
      img = img.convert('RGB')
    elif img.mode == '1':
      img = img.convert('L')
    arr = np.array(img)
  try:
    return as_float_rgb(arr)
  except ValueError as e:
    raise ValueError(f'Cannot use image {path}: {e}') from e


def folder_images(
    path: PathLike,
    max_images: Optional[int] = None,
) -> list[np.ndarray]:
  """Reads every image file of a folder (not recursive), sorted by name.

  Files with an extension in :data:`IMAGE_EXTENSIONS` (case-insensitive) are
  read with Pillow; other files are ignored. Grayscale images are stacked to
  3 channels, alpha channels are dropped, palette images are expanded, EXIF
  orientation is applied and only the first frame of multi-page files is used.

  Args:
    path: the folder.
    max_images: read only the first ``max_images`` files (in name order);
      ``None`` reads all.

  Returns:
    List of ``float32`` arrays of shape ``(H, W, 3)`` in ``[0, 1]``, in file
    name order.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    NotADirectoryError: ``path`` is not a folder.
    ValueError: the folder holds no image file.

  Example:
    >>> images = folder_images(default_data_dir() / 'CBSD68', max_images=2)
    ... # doctest: +SKIP
    >>> images[0].shape  # doctest: +SKIP
    (321, 481, 3)
  """
  max_images = _check_max_images(max_images)
  folder = Path(path).expanduser()
  if not folder.exists():
    raise FileNotFoundError(f'Image folder {folder} does not exist.')
  if not folder.is_dir():
    raise NotADirectoryError(f'{folder} is not a folder.')
  files = sorted(
      (p for p in folder.iterdir()
       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
      key=lambda p: p.name)
  if not files:
    raise ValueError(
        f'No image files ({", ".join(IMAGE_EXTENSIONS)}) in folder {folder}.')
  if max_images is not None:
    files = files[:max_images]
  return [_read_image_file(p) for p in files]


# ---------------------------------------------------------------------------
# TensorFlow Datasets
# ---------------------------------------------------------------------------


def tfds_images(
    name: str,
    split: str = 'train',
    data_dir: Optional[PathLike] = None,
    download: bool = False,
    max_images: Optional[int] = None,
) -> list[np.ndarray]:
  """Reads the ``image`` feature of a TFDS dataset via ``tfds.data_source``.

  ``tfds.data_source`` gives random access to prepared ``array_record`` (or
  parquet) files and needs no TensorFlow. ``tensorflow_datasets`` is imported
  here, not at module import, so it stays optional.

  Without ``download`` nothing is fetched: if the dataset is not prepared
  under ``data_dir`` a :class:`FileNotFoundError` says where it looked and
  that ``--download`` (``download=True``) fetches it. (``tfds`` itself would
  otherwise retry the network for minutes, or fail with an unrelated
  message.)

  Args:
    name: TFDS dataset name, optionally with config/version, e.g. ``'stl10'``
      or ``'celeb_a'``.
    split: TFDS split string, e.g. ``'train'``, ``'test'``,
      ``'train[:1000]'``.
    data_dir: TFDS data folder; ``None`` uses TFDS's default
      (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    download: download and prepare the dataset if missing.
    max_images: read only the first ``max_images`` records of the split.

  Returns:
    List of ``float32`` arrays of shape ``(H, W, 3)`` in ``[0, 1]``.

  Raises:
    ImportError: ``tensorflow_datasets`` is not installed.
    FileNotFoundError: ``download=False`` and the dataset is not prepared.
    KeyError: the dataset has no ``image`` feature.

  Example:
    >>> import tensorflow_datasets as tfds  # doctest: +SKIP
    >>> with tfds.testing.mock_data(num_examples=4):  # doctest: +SKIP
    ...   images = tfds_images('stl10')
    >>> len(images), images[0].shape  # doctest: +SKIP
    (4, (96, 96, 3))
  """
  max_images = _check_max_images(max_images)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'Reading the TFDS dataset {name!r} needs tensorflow-datasets: '
        'pip install "tensorflow-datasets>=4.9" importlib_resources '
        '(or pip install "mgtrain[tfds]").') from e

  data_dir_str = None if data_dir is None else str(Path(data_dir).expanduser())
  try:
    source = tfds.data_source(
        name, split=split, data_dir=data_dir_str, download=download)
  except Exception as e:  # pylint: disable=broad-except
    if download:
      raise
    _raise_if_not_prepared(tfds, name, data_dir_str, e)
    raise

  n = len(source)
  if max_images is not None:
    n = min(n, max_images)
  if n == 0:
    raise ValueError(f'TFDS dataset {name!r} split {split!r} is empty.')
  images = []
  for i in range(n):
    example = source[i]
    if 'image' not in example:
      raise KeyError(
          f'TFDS dataset {name!r} has no "image" feature; features: '
          f'{sorted(example)}.')
    images.append(as_float_rgb(np.asarray(example['image'])))
  return images


def _raise_if_not_prepared(tfds, name: str, data_dir: Optional[str],
                           cause: BaseException) -> None:
  """Raises a clear FileNotFoundError if ``name`` is not prepared."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ == 'DatasetNotFoundError':
      # tfds's own message lists every dataset it knows (4 KB); keep its hint.
      hint = [line.strip() for line in str(e).splitlines() if line.startswith('Did you mean')]
      raise ValueError(
          f"Unknown dataset {name!r}: not 'bundled', 'folder' or a TFDS dataset name"
          + (f' ({hint[0]})' if hint else '') + '.') from cause
    return  # another failure: let the original error through
  try:
    prepared = builder.is_prepared()
  except Exception:  # pylint: disable=broad-except
    prepared = False
  if prepared:
    return
  where = data_dir
  if where is None:
    where = str(getattr(builder, 'data_dir_root', None) or
                Path(builder.data_dir).parents[1])
  raise FileNotFoundError(
      f'TFDS dataset {name!r} is not prepared in data_dir {where!r} (looked '
      f'for {builder.data_dir}). Pass --download (download=True) to download '
      'and prepare it, or point --data-dir at a folder that has it.'
  ) from cause


# ---------------------------------------------------------------------------
# Dispatcher and split
# ---------------------------------------------------------------------------


def load_images(
    source: str,
    *,
    data_dir: Optional[PathLike] = None,
    download: bool = False,
    split: str = 'train',
    max_images: Optional[int] = None,
) -> list[np.ndarray]:
  """Loads images from a source named by a string.

  * ``'bundled'``: :func:`bundled_images` (``data_dir``, ``download`` and
    ``split`` are ignored).
  * ``'folder'``: :func:`folder_images` of ``data_dir`` (required).
  * anything else: a TFDS dataset name for :func:`tfds_images`, e.g.
    ``'stl10'`` or ``'celeb_a'``.

  Args:
    source: ``'bundled'``, ``'folder'`` or a TFDS dataset name.
    data_dir: the image folder (``'folder'``) or the TFDS data folder.
    download: TFDS only: download the dataset if missing.
    split: TFDS only: the split string.
    max_images: keep at most this many images.

  Returns:
    List of ``float32`` arrays of shape ``(H, W, 3)`` in ``[0, 1]``.

  Example:
    >>> len(load_images('bundled', max_images=3))
    3
  """
  if not isinstance(source, str) or not source:
    raise ValueError(f'source must be a non-empty string, got {source!r}.')
  if source == 'bundled':
    return bundled_images(max_images=max_images)
  if source == 'folder':
    if data_dir is None:
      raise ValueError("source='folder' needs data_dir (the image folder).")
    return folder_images(data_dir, max_images=max_images)
  return tfds_images(
      source,
      split=split,
      data_dir=data_dir,
      download=download,
      max_images=max_images)


def train_val_split(
    images: Sequence[np.ndarray],
    val_fraction: float = 0.2,
    min_val: int = 1,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Deterministic split by image: the last images go to validation.

  The validation set has ``max(min_val, round(val_fraction * n))`` images,
  capped so that at least one training image remains. Splitting by image
  (not by patch) keeps validation patches from images never seen in training.

  Args:
    images: list of images, length ``n >= 2``.
    val_fraction: fraction of images for validation, in ``[0, 1)``.
    min_val: minimum number of validation images (``>= 1``).

  Returns:
    ``(train, val)``: two lists, ``train + val == list(images)``.

  Raises:
    ValueError: fewer than 2 images, or invalid ``val_fraction``/``min_val``.

  Example:
    >>> train, val = train_val_split(list(range(10)), val_fraction=0.2)
    >>> train, val
    ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
  """
  images = list(images)
  n = len(images)
  if n < 2:
    raise ValueError(
        f'Need at least 2 images to split into train and validation, got {n}.')
  if not (0.0 <= val_fraction < 1.0) or math.isnan(val_fraction):
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}.')
  if min_val < 1:
    raise ValueError(f'min_val must be >= 1, got {min_val}.')
  n_val = max(int(min_val), int(round(val_fraction * n)))
  if n_val > n - 1:
    warnings.warn(
        f'Only {n} images: using {n - 1} for validation instead of {n_val} so '
        'that one remains for training.', stacklevel=2)
    n_val = n - 1
  return images[:n - n_val], images[n - n_val:]
