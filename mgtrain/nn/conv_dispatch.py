"""Which algorithm computes each standard 3x3 convolution on CPU.

XLA's CPU backend computes every convolution directly (Eigen's spatial
convolution). Two other forms of the same stride-1 ``SAME`` 3x3 NHWC
convolution are faster on some layers:

* :func:`mgtrain.nn.im2col.im2col_conv3x3`, one matrix product of the nine
  shifted copies of the input, on meshes of at most 2 x 2 pixels, where the
  direct method runs at a few GFLOP/s (3-14x faster there);
* :func:`mgtrain.nn.winograd.winograd_conv3x3`, Winograd's F(4x4, 3x3), on
  layers wide and big enough for its transforms to pay off (about 2x faster
  at 128 channels from 1,024 batch x pixels).

The rest, and every other convolution passed through it (1x1, strided),
are direct, through :func:`mgtrain.nn.direct_conv.direct_conv`: XLA's
convolution, with a kernel gradient that stays fast inside a loop body.

:class:`Conv3x3Dispatch` is a drop-in ``lax.conv_general_dilated`` for
``flax.linen.Conv`` that picks among the three (``standard_conv(...,
algorithm='winograd')`` builds that layer; ``'auto'`` does on CPU).

Example:
  >>> import jax.numpy as jnp
  >>> dispatch = Conv3x3Dispatch()
  >>> dn = ("NHWC", "HWIO", "NHWC")
  >>> [dispatch.choose(x, jnp.zeros((3, 3, 128, 128)), (1, 1), "SAME", dimension_numbers=dn)
  ...  for x in (jnp.zeros((192, 2, 2, 128)), jnp.zeros((16, 8, 8, 128)),
  ...            jnp.zeros((2, 8, 8, 128)))]
  ['im2col', 'winograd', 'direct']
"""

from __future__ import annotations

import dataclasses
import math

import jax

from mgtrain.nn.direct_conv import direct_conv
from mgtrain.nn.im2col import im2col_conv3x3
from mgtrain.nn.winograd import SUPPORTED_DTYPES, winograd_conv3x3

ALGORITHMS = ("direct", "im2col", "winograd")


def _is_same_3x3(rhs_shape, window_strides, padding, lhs_dilation, rhs_dilation,
                 dimension_numbers, feature_group_count, batch_group_count) -> bool:
  if tuple(rhs_shape[:2]) != (3, 3) or len(rhs_shape) != 4:
    return False
  if tuple(window_strides) != (1, 1) or feature_group_count != 1 or batch_group_count != 1:
    return False
  if any(d not in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())):
    return False
  same = padding == "SAME" or (not isinstance(padding, str)
                               and [tuple(p) for p in padding] == [(1, 1), (1, 1)])
  if not same:
    return False
  dn = jax.lax.conv_dimension_numbers((1, 1, 1, 1), tuple(rhs_shape), dimension_numbers)
  return dn == jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


@dataclasses.dataclass(frozen=True)
class Conv3x3Dispatch:
  """A drop-in ``lax.conv_general_dilated`` for ``flax.linen.Conv``.

  ``nn.Conv(..., conv_general_dilated=Conv3x3Dispatch())`` keeps Flax's
  parameters (same names, shapes and initialisers, so the same values from
  the same key). Every stride-1 ``SAME`` 3x3 NHWC convolution whose operands
  share a dtype (and whose ``preferred_element_type`` is that dtype or
  unset) is computed by the algorithm :meth:`choose` names; anything else
  (strides, dilation, groups, other kernels) is direct, through
  :func:`mgtrain.nn.direct_conv.direct_conv` (``lax.conv_general_dilated``'s
  values; inside a rolled loop body its kernel gradient is a forward
  convolution, which XLA's CPU compiler keeps fast there). A frozen dataclass rather than a
  function so that the module's ``repr`` (a step-cache key) is the same in
  every process.

  ``im2col_max_side``: meshes with both sides at most this take the patch
  matrix product (:mod:`mgtrain.nn.im2col`, whose docstring has the
  timings), whatever the width, batch and dtype.

  ``winograd_thresholds`` keep small convolutions off Winograd: its
  transforms are memory traffic that only pays off when the matrix products
  are big, and only float32/float64 take it (in bfloat16 the transform
  constants would cost most of the mantissa). Each row ``(channels,
  pixels)`` says: a conv whose narrower side (input or output channels) has
  at least ``channels`` takes Winograd from ``pixels`` = batch x height x
  width on; the last row that applies wins, and a conv narrower than the
  first row never does.

  Fwd+bwd on the 2-core CPU, Winograd / direct, median of 7, one process
  (``python -m experiments.winograd_thresholds``, 2026-12-04 evening; the
  range is over meshes 4^2 to 32^2 at each pixel count):

  ============  ==========  ==========  ==========  ==========
  channels      256 px      1,024 px    2,048 px    4,096 px
  ============  ==========  ==========  ==========  ==========
  32 -> 32      0.63-1.26   0.77-1.15   0.34-0.78   0.39-1.04
  64 -> 64      1.37-1.49   0.82-1.16   0.65-1.53   0.62-0.98
  128 -> 128    2.45-2.46   0.62-0.82   0.57-0.69   0.39-0.49
  256 -> 256    2.83-3.52   1.17-1.33   0.59-0.72   0.55-0.57
  ============  ==========  ==========  ==========  ==========

  and from 16k pixels on, 0.84-1.01 at 32 channels and 0.40-0.50 at 128.
  A second run moved single cells by up to 0.3 but agreed on these
  boundaries (docs/benchmark_cpu.md). With 3 input channels (a network's
  first layer) Winograd was 1.2-3.6x slower at every size. Hence the
  default rows: 32 channels from 4,096 pixels, 96 from 1,024, 192 from
  2,048.
  """

  winograd_thresholds: tuple[tuple[int, int], ...] = ((32, 4096), (96, 1024), (192, 2048))
  im2col_max_side: int = 2

  def winograd_min_pixels(self, channels: int) -> int | None:
    """Batch x pixels from which a conv this wide takes Winograd (None: never)."""
    found = None
    for min_channels, pixels in self.winograd_thresholds:
      if channels >= min_channels:
        found = pixels
    return found

  def choose(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
             precision=None, preferred_element_type=None) -> str:
    """``'im2col'``, ``'winograd'`` or ``'direct'``: how this call is computed.

    Takes ``lax.conv_general_dilated``'s arguments (arrays or anything with
    ``shape`` and ``dtype``).
    """
    del precision
    if not (_is_same_3x3(rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                         dimension_numbers, feature_group_count, batch_group_count)
            and rhs.dtype == lhs.dtype and preferred_element_type in (None, lhs.dtype)):
      return "direct"
    _, height, width, _ = lhs.shape
    if max(height, width) <= self.im2col_max_side:
      return "im2col"
    threshold = self.winograd_min_pixels(min(rhs.shape[2:]))   # HWIO: the narrower side
    if (lhs.dtype in SUPPORTED_DTYPES and threshold is not None
        and math.prod(lhs.shape[:3]) >= threshold):
      return "winograd"
    return "direct"

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1,
               precision=None, preferred_element_type=None):
    algorithm = self.choose(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                            dimension_numbers, feature_group_count, batch_group_count,
                            precision, preferred_element_type)
    if algorithm == "im2col":
      return im2col_conv3x3(lhs, rhs, precision=precision)
    if algorithm == "winograd":
      return winograd_conv3x3(lhs, rhs)
    return direct_conv(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
