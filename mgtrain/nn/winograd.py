"""3x3 convolutions by Winograd's minimal filtering algorithm F(4x4, 3x3).

A stride-1 3x3 convolution computes each 4x4 block of outputs from a 6x6
tile of inputs. Winograd's algorithm (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016, Eq. 10) writes that block as

  Y = A^T [ (G g G^T) * (B^T d B) ] A

with ``d`` the 6x6 input tile, ``g`` the 3x3 kernel, ``*`` an elementwise
product and the constant matrices below (Toom-Cook interpolation at 0, 1,
-1, 2, -1/2 and infinity). Summed over input channels, the elementwise products of all
tiles become 36 independent matrix products, one per tile position ``p``:

  M_p = V_p U_p,   V_p: (tiles, C_in),  U_p = (G g G^T)_p: (C_in, C_out),

so a layer needs ``36 / 16 = 2.25`` multiplies per output and input channel
instead of the direct method's 9: 4x fewer. The transforms ``B^T d B`` and
``A^T M A`` are additions and small constant multiples over the whole
batch: memory traffic, not arithmetic.

Why this is here. XLA's CPU backend computes a convolution directly
(Eigen's spatial convolution), and its two gradient convolutions are slower
than the forward one. Written as transforms and 36 matrix products, the
whole layer is dots and loop fusions, and so is its gradient (JAX's
autodiff of this function: transposed transforms and 2 x 36 dots). 128
channels, fwd+bwd of ``0.5 sum(y^2)``, 2-core CPU, median of 7, one
process (2026-12-04):

  ==========  =========  ==========
  mesh x B    lax.conv   Winograd
  ==========  =========  ==========
  64^2 x 16   383 ms     179 ms
  32^2 x 48   309 ms     164 ms
  16^2 x 96   128 ms     75 ms
  8^2 x 192   64 ms      31 ms
  ==========  =========  ==========

The forward pass alone is about as fast as ``lax.conv`` (113 vs 105 ms at
64^2 x 16): the transforms are memory-bound. F(2x2, 3x3) (2.25x fewer
multiplies, but a 4x larger transformed input) was no faster than
``lax.conv`` in the same probe.

Accuracy. The transforms are exact in exact arithmetic. In float32 the
output differs from ``lax.conv`` by about 1e-5 of its largest entry (the
direct method's own error is about 1e-6), and gradients agree with a
float64 reference as closely as the direct method's do (see the points
below). Only float32 and float64 operands take this path: in bfloat16 the
transform constants would cost most of the mantissa.

Costs. The transformed batch is 2.25x the input, so XLA plans more working
memory (the ResNet's 4-level MGE step at 64^2: 568 MB against 309 MB), and
compiling the step takes about 1.5-2x as long. The transforms' adjoints are
written out (:func:`_scatter_tiles`): with JAX's transpose rules the same
step took 2.47 / 2.65 s instead of 1.96 / 2.12 s and planned 887 MB (one
process each, alternated; direct convs: 3.46 / 3.47 s).

Example:
  >>> import jax, jax.numpy as jnp
  >>> x = jax.random.normal(jax.random.key(0), (2, 12, 10, 8))
  >>> w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))
  >>> direct = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
  ...     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  >>> bool(jnp.allclose(winograd_conv3x3(x, w), direct, atol=1e-4))
  True
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

TILE = 4           # outputs per tile side (m in F(m x m, 3 x 3))
_SPAN = TILE + 2   # inputs per tile side

# F(4, 3) by Toom-Cook at the points 0, 1, -1, 2, -1/2 and infinity
# (Lavin & Gray's Eq. 10 construction). Lavin & Gray's own points, 0, +-1,
# +-2, give a transform whose float32 rounding error can reach 1e-3 of a
# weight gradient: the ResNet's first 3x3 kernel, 4 x 32^2 batch, in
# tests/test_winograd.py, against a float64 reference: 1.2e-3 with +-2,
# 1.8e-6 with +-1/2, 1.2e-6 with these, and 2.5e-6 for XLA's direct
# convolution. That the choice of points sets the error is the finding of
# Barabasz et al., "Error analysis and improving the accuracy of Winograd
# convolution for deep neural networks" (ACM TOMS, 2020).
A_T = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -1 / 2, 0],
                [0, 1, 1, 4, 1 / 4, 0],
                [0, 1, -1, 8, -1 / 8, 1]], np.float64)
G = np.array([[1, 0, 0],
              [-1 / 3, -1 / 3, -1 / 3],
              [1 / 3, -1 / 3, 1 / 3],
              [1 / 15, 2 / 15, 4 / 15],
              [-16 / 15, 8 / 15, -4 / 15],
              [0, 0, 1]], np.float64)
B_T = np.array([[1, 3 / 2, -2, -3 / 2, 1, 0],
                [0, -1, -5 / 2, -1 / 2, 1, 0],
                [0, 1, 1 / 2, -5 / 2, 1, 0],
                [0, -1 / 2, -1, 1 / 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 1, 3 / 2, -2, -3 / 2, 1]], np.float64)

SUPPORTED_DTYPES = (jnp.float32, jnp.float64)


def _combine(matrix: np.ndarray, parts: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
  """``[sum_j matrix[i, j] parts[j] for i]``, skipping zeros and unit factors.

  Written out term by term (not as a dot with a 6x6 matrix) so that XLA
  fuses each row into one elementwise loop over the batch; as an
  ``einsum`` the same transform was 2.4x slower on CPU. The terms are
  ``lax`` primitives, not ``jnp`` operators: the same jaxpr, but a ``jnp``
  operator under a trace goes through ``jit``'s dispatch, and the
  transforms of a UNet MGE step call this about a thousand times.
  """
  rows = []
  for coefficients in matrix:
    total = None
    for c, part in zip(coefficients, parts):
      if c == 0:
        continue
      term = (part if c == 1 else lax.neg(part) if c == -1
              else lax.mul(part, np.asarray(c, part.dtype)))
      total = term if total is None else lax.add(total, term)
    rows.append(total)
  return rows


def winograd_conv3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """``SAME`` 3x3 convolution, stride 1, of NHWC ``x`` with an HWIO ``kernel``.

  Same result as ``lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`` up to rounding (see the
  module docstring), for any ``H, W >= 1``: meshes that are not multiples of
  4 are padded with zeros below and to the right, which the ``SAME``
  convolution sees as its own zero boundary, and cropped afterwards.

  Args:
    x: ``(B, H, W, C_in)``, float32 or float64.
    kernel: ``(3, 3, C_in, C_out)``, same dtype as ``x``.

  Returns:
    ``(B, H, W, C_out)``.
  """
  if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.ndim != 4:
    raise ValueError(f"expected NHWC input and a (3, 3, C_in, C_out) kernel, got "
                     f"{x.shape} and {kernel.shape}")
  if kernel.shape[2] != x.shape[-1]:
    raise ValueError(f"kernel expects {kernel.shape[2]} input channels, input has {x.shape[-1]}")
  if x.dtype not in SUPPORTED_DTYPES or kernel.dtype != x.dtype:
    raise ValueError(f"Winograd convolutions need float32 or float64 operands of one dtype, "
                     f"got {x.dtype} and {kernel.dtype}")
  n, height, width, c_in = x.shape
  c_out = kernel.shape[-1]
  v = _input_transform(x).reshape(_SPAN * _SPAN, -1, c_in)
  g = jnp.asarray(G, x.dtype)
  u = jnp.einsum("ak,klio,bl->abio", g, kernel, g).reshape(_SPAN * _SPAN, c_in, c_out)
  m = jnp.einsum("ptc,pcd->ptd", v, u)
  th, tw = _tile_grid(height, width)
  return _output_transform(m.reshape(_SPAN, _SPAN, n, th, tw, c_out), height, width)


# The transforms are linear, and their adjoints are written out below rather
# than left to JAX's transpose rules. Those turn each of the 12 strided
# slices into a full-size zero pad plus an add; written out, the adjoint of a
# tile slice is one stack and reshape.


def _scatter_tiles(parts, axis: int):
  """Adjoint of cutting 6-wide tiles at stride 4 along ``axis``.

  ``parts[k]`` holds, for every tile ``j`` (along ``axis``, ``T`` tiles),
  the value that lands at position ``4 j + k``; positions shared by two
  tiles (``k = 4, 5`` of tile ``j`` are ``0, 1`` of tile ``j + 1``) add up.
  Returns the ``4 T + 2`` positions.
  """
  def pad(a, before, after):
    widths = [(0, 0)] * a.ndim
    widths[axis] = (before, after)
    return jnp.pad(a, widths)
  blocks = [pad(parts[0], 0, 1) + pad(parts[4], 1, 0), pad(parts[1], 0, 1) + pad(parts[5], 1, 0),
            pad(parts[2], 0, 1), pad(parts[3], 0, 1)]
  out = jnp.stack(blocks, axis=axis + 1)
  shape = out.shape[:axis] + (TILE * out.shape[axis],) + out.shape[axis + 2:]
  return jax.lax.slice_in_dim(out.reshape(shape), 0, shape[axis] - 2, axis=axis)


def _strided(a, start: int, length: int, axis: int):
  """``a[..., start:start + length:TILE, ...]`` along ``axis``, as one ``lax``
  slice (a ``jnp`` index under a trace goes through ``jit``'s dispatch)."""
  return lax.slice_in_dim(a, start, min(start + length, a.shape[axis]), TILE, axis)


def _at(a, index: int, axis: int):
  """``a[..., index, ...]`` along ``axis`` (the axis dropped), as ``lax`` ops."""
  return lax.index_in_dim(a, index, axis, keepdims=False)


def _tile_grid(height: int, width: int) -> tuple[int, int]:
  return -(-height // TILE), -(-width // TILE)


@jax.custom_vjp
def _input_transform(x):
  """``B^T d B`` of every 6x6 input tile at stride 4: ``(6, 6, n, th, tw, C)``."""
  n, height, width, _ = x.shape
  th, tw = _tile_grid(height, width)
  # One zero row/column of SAME padding on top/left; bottom/right up to the
  # tile grid plus the SAME row/column.
  xp = jnp.pad(x, ((0, 0), (1, TILE * th - height + 1), (1, TILE * tw - width + 1), (0, 0)))
  rows = [_strided(xp, a, TILE * th, axis=1) for a in range(_SPAN)]    # (n, th, W', c)
  r = jnp.stack(_combine(B_T, rows))                                    # (6, n, th, W', c)
  cols = [_strided(r, b, TILE * tw, axis=3) for b in range(_SPAN)]     # (6, n, th, tw, c)
  return jnp.stack(_combine(B_T, cols), axis=1)


def _input_transform_fwd(x):
  return _input_transform(x), x.shape


def _input_transform_bwd(shape, dv):
  _, height, width, _ = shape
  dcols = _combine(B_T.T, [_at(dv, b, 1) for b in range(_SPAN)])       # 6 x (6, n, th, tw, c)
  dr = _scatter_tiles(dcols, axis=3)                                    # (6, n, th, W', c)
  drows = _combine(B_T.T, [_at(dr, a, 0) for a in range(_SPAN)])       # 6 x (n, th, W', c)
  dxp = _scatter_tiles(drows, axis=1)                                   # (n, H', W', c)
  return (dxp[:, 1:1 + height, 1:1 + width],)


_input_transform.defvjp(_input_transform_fwd, _input_transform_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _output_transform(m, height: int, width: int):
  """``A^T M A`` of every tile, assembled into ``(n, height, width, C)``."""
  n, th, tw, c = m.shape[2:]
  yr = jnp.stack(_combine(A_T, [_at(m, a, 0) for a in range(_SPAN)]))   # (4, 6, n, th, tw, d)
  y = jnp.stack(_combine(A_T, [_at(yr, b, 1) for b in range(_SPAN)]), axis=1)  # (4, 4, n, th, tw, d)
  y = jnp.transpose(y, (2, 3, 0, 4, 1, 5)).reshape(n, TILE * th, TILE * tw, c)
  return y[:, :height, :width]


def _output_transform_fwd(m, height, width):
  return _output_transform(m, height, width), None


def _output_transform_bwd(height, width, _, dy):
  n, _, _, c = dy.shape
  th, tw = _tile_grid(height, width)
  dy = jnp.pad(dy, ((0, 0), (0, TILE * th - height), (0, TILE * tw - width), (0, 0)))
  cols = [_strided(dy, s, TILE * tw, axis=2) for s in range(TILE)]     # (n, 4 th, tw, d)
  dcols = _combine(A_T.T, cols)                                         # 6 x (n, 4 th, tw, d)
  dm = [jnp.stack(_combine(A_T.T, [_strided(d, r, TILE * th, axis=1) for r in range(TILE)]))
        for d in dcols]
  return (jnp.stack(dm, axis=1),)                                       # (6, 6, n, th, tw, d)


_output_transform.defvjp(_output_transform_fwd, _output_transform_bwd)
