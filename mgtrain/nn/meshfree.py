"""Mesh-free convolutions (MFC paper, Section 3, Eq. 18-21).

A mesh-free convolution is defined on functions, not on pixels. The input
``u`` (``d`` channels) is first mapped by a learned 1x1 channel map ``R``
(``d -> c``), which gives the initial condition of the anisotropic heat
equation (Eq. 18-19)

  v~_t = L(alpha) v~,   L = a_xx d_xx + 2 a_xy d_xy + a_yy d_yy,   v~(0) = R u,

solved up to time ``tau``; the output is a directional derivative of the
result, ``v = (g0 + [gx, gy] . grad) v~(tau)``. Because the PDE is linear
with constant coefficients, its symbol is closed form (Eq. 21)::

  S(kx, ky) = (g0 + i kx gx + i ky gy) * exp(-tau (a_xx kx^2 + 2 a_xy kx ky + a_yy ky^2))

and the layer is ``irfft2(S * rfft2(R u))``. The domain is ``[0, 1]^2`` with
periodic boundaries, so an ``H x W`` image has spacings ``h_y = 1/H``,
``h_x = 1/W`` and physical frequencies ``k = 2 pi m`` for integer modes
``m``. The same parameters therefore mean the same continuous operator on
every mesh: that is what makes its gradients converge as the mesh refines
(MFC paper, Lemmas 2-3), unlike a kxk stencil whose physical width shrinks
with ``h``.

Axes: ``x`` is the column (width) axis and ``y`` the row (height) axis of
an NHWC image.

Parametrisation (per output channel, 7 numbers as in the paper):

* ``tau = exp(raw_tau) > 0``;
* ``alpha = L L^T`` with ``L = [[exp(l_xx), 0], [l_xy, exp(l_yy)]]`` scaled by
  ``length_scale^2``, so ``a_xx, a_yy > 0`` and ``a_xx a_yy - a_xy^2 > 0`` for
  ANY finite raw values (no clipping);
* ``gamma = (g0, gx, gy)`` unconstrained; ``gx, gy`` are stored in units of
  ``length_scale`` so that ``i k gx`` is O(1) at the filter's own scale.

``length_scale`` (a fraction of the domain) sets the initial filter width:
at initialisation ``sqrt(2 tau a) ~ length_scale``. It is a unit, not a
mesh: changing the mesh does not change the operator.

On an even mesh the Nyquist mode ``k_N`` and ``-k_N`` are the same grid
function, so the discrete symbol there is the average of the continuous
symbol at ``+k_N`` and ``-k_N`` (both axes; four values at the corner). That
is exactly what the real operator does to ``cos(k_N x)``, keeps the
discrete operator real, and lets an MFC reproduce any 3x3 stencil on a fixed
mesh (Lemma 4; simply zeroing the derivative part there left a 3.9 % residual
on the Nyquist lines).

Example:
  >>> import jax, jax.numpy as jnp
  >>> layer = MeshFreeConv(8)
  >>> params = layer.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> layer.apply(params, jnp.ones((2, 64, 64, 3))).shape   # any mesh
  (2, 64, 64, 8)
  >>> count_params_mfc = sum(x.size for x in jax.tree.leaves(params))
  >>> count_params_mfc == 3 * 8 + 8 + 7 * 8   # R, its bias, 7 per channel
  True

References:
  Multiscale training of convolutional neural networks / mesh-free
  convolutions, ``../shared/papers/mesh-free-convolutions.md`` Section 3.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class MFCCoefficients(NamedTuple):
  """Physical coefficients of Eq. 18-21, each of shape ``channels`` (or broadcastable)."""

  tau: jnp.ndarray
  a_xx: jnp.ndarray
  a_xy: jnp.ndarray
  a_yy: jnp.ndarray
  g0: jnp.ndarray
  gx: jnp.ndarray
  gy: jnp.ndarray
  # a_yy - a_xy^2 / a_xx > 0. When given, the quadratic form is evaluated as
  # a_xx (kx + a_xy/a_xx ky)^2 + schur ky^2, a sum of squares that stays >= 0
  # in floating point even for nearly degenerate alpha.
  schur: jnp.ndarray | None = None


RAW_NAMES = ("raw_tau", "l_xx", "l_xy", "l_yy", "g0", "gx", "gy")


def coefficients(raw: jnp.ndarray, length_scale: float = 1.0) -> MFCCoefficients:
  """Maps raw parameters ``(..., 7)`` to physical coefficients (see module docstring).

  Ellipticity is by construction: ``alpha = length_scale^2 L L^T`` with a
  lower-triangular ``L`` of positive diagonal, so for any finite ``raw``,
  ``a_xx > 0``, ``a_yy > 0`` and ``a_xx a_yy - a_xy^2 = a_xx * schur =
  length_scale^4 exp(2 l_xx + 2 l_yy) > 0``. :func:`symbol` evaluates the
  quadratic form through ``schur`` as a sum of squares, so it is
  non-negative in floating point too.
  """
  raw = jnp.asarray(raw)
  if raw.shape[-1] != 7:
    raise ValueError(f"raw MFC parameters need a trailing axis of 7 "
                     f"({', '.join(RAW_NAMES)}), got shape {raw.shape}")
  raw_tau, l_xx, l_xy, l_yy, g0, gx, gy = jnp.moveaxis(raw, -1, 0)
  s2 = length_scale ** 2
  d_x, d_y = jnp.exp(l_xx), jnp.exp(l_yy)
  return MFCCoefficients(
      tau=jnp.exp(raw_tau),
      a_xx=s2 * d_x * d_x,
      a_xy=s2 * d_x * l_xy,
      a_yy=s2 * (l_xy * l_xy + d_y * d_y),
      g0=g0, gx=length_scale * gx, gy=length_scale * gy, schur=s2 * d_y * d_y)


def physical_frequencies(n: int, spacing: float, real: bool = False) -> jnp.ndarray:
  """Angular frequencies ``2 pi m / (n spacing)`` of an ``n``-point periodic mesh.

  ``real=True`` gives the ``n // 2 + 1`` non-negative frequencies of ``rfft``.
  """
  if real:
    return 2 * jnp.pi * jnp.fft.rfftfreq(n, d=spacing)
  return 2 * jnp.pi * jnp.fft.fftfreq(n, d=spacing)


def symbol(coeffs: MFCCoefficients, ky: jnp.ndarray, kx: jnp.ndarray,
           odd_mask: jnp.ndarray | float = 1.0) -> jnp.ndarray:
  """The closed-form symbol of Eq. 21 at frequencies ``(ky, kx)``.

  ``S = (g0 + i kx gx + i ky gy) exp(-tau (a_xx kx^2 + 2 a_xy kx ky + a_yy ky^2))``.
  Every argument broadcasts; a common layout is ``ky`` of shape ``(H, 1, 1)``,
  ``kx`` of shape ``(1, W', 1)`` and coefficients of shape ``(C,)``, giving
  ``(H, W', C)``. ``odd_mask`` multiplies the derivative part (e.g. to zero
  it at a 1D Nyquist mode); :func:`discrete_symbol` averages instead.
  """
  c = coeffs
  if c.schur is None:
    quad = c.a_xx * kx * kx + 2 * c.a_xy * kx * ky + c.a_yy * ky * ky
  else:
    shifted = kx + (c.a_xy / c.a_xx) * ky
    quad = c.a_xx * shifted * shifted + c.schur * ky * ky
  damp = jnp.exp(-c.tau * quad)
  return jax.lax.complex(c.g0 * damp, (c.gx * kx + c.gy * ky) * odd_mask * damp)


def discrete_symbol(coeffs: MFCCoefficients, height: int, width: int,
                    spacing: tuple[float, float]) -> jnp.ndarray:
  """The symbol on the ``rfft2`` grid of a ``height x width`` mesh.

  ``spacing = (h_y, h_x)``. Nyquist lines use the average over ``+-k_N`` (see
  the module docstring). Returns ``(height, width // 2 + 1) + coeffs.tau.shape``.
  """
  trailing = (None,) * jnp.ndim(coeffs.tau)
  ky = physical_frequencies(height, spacing[0])
  kx = physical_frequencies(width, spacing[1], real=True)
  even_y, even_x = height % 2 == 0, width % 2 == 0
  # One evaluation on a grid extended by the partner frequencies -k_N, then
  # averaging by slices: each separate symbol evaluation added ~0.5 s to the
  # gradient's compile time on CPU (3.0 s instead of 0.7 s at 128^2).
  if even_y:
    ky = jnp.concatenate([ky, -ky[height // 2:height // 2 + 1]])
  if even_x:
    kx = jnp.concatenate([kx, -kx[-1:]])
  s = symbol(coeffs, ky[(slice(None), None) + trailing], kx[(None, slice(None)) + trailing])
  if even_x:
    s = jnp.concatenate([s[:, :-2], 0.5 * (s[:, -2:-1] + s[:, -1:])], axis=1)
  if even_y:
    half = height // 2
    s = jnp.concatenate([s[:half], 0.5 * (s[half:half + 1] + s[-1:]), s[half + 1:-1]], axis=0)
  return s


def _rfft_column_weights(width: int, dtype) -> jnp.ndarray:
  """How often each ``rfft`` column appears in the full spectrum: 1 or 2.

  Columns ``0`` and (for even ``width``) ``width / 2`` stand for themselves;
  every other column also stands for its Hermitian partner.
  """
  w = jnp.full((width // 2 + 1,), 2.0, dtype).at[0].set(1.0)
  return w.at[-1].set(1.0) if width % 2 == 0 else w


def _apply_symbol(spec, s, pairwise: bool):
  return jnp.einsum("bihw,iohw->bohw", spec, s) if pairwise else spec * s


def _reduce_to(p, shape):
  """Sums ``p`` over the axes that broadcasting an array of ``shape`` against it
  added or stretched, so the result has ``shape``: the adjoint of that broadcast."""
  lead = p.ndim - len(shape)
  if lead:
    p = jnp.sum(p, axis=tuple(range(lead)))
  axes = tuple(i for i, (n, m) in enumerate(zip(shape, p.shape)) if n == 1 and m != 1)
  return jnp.sum(p, axis=axes, keepdims=True) if axes else p


# Two real images in one complex FFT. A per-channel filter is the same real
# operator on every image of a channel, so it can run on z = a + i b for
# two images a, b of that channel: with a Hermitian symbol S (S(-k) =
# conj(S(k)), true of every discrete symbol, see :func:`discrete_symbol`)
# the operator's kernel is real, and ifft2(S fft2(a + i b)) = A a + i A b
# exactly. Half as many transforms, each a complex one on the full grid:
# the same arithmetic as rfft2/irfft2, but XLA's complex transforms on CPU
# beat its real ones, the inverse most (one jitted call on 16 images of
# 128^2: rfft2 0.54 ms, irfft2 0.86 ms; as 8 complex images, fft2 0.36 ms,
# ifft2 0.34 ms). Forward filter, 128 channels x 16
# images of 128^2, one channel a chunk in a loop: 222-233 ms in real
# transforms, 181-192 ms packed; 4 images of 256^2: 1,033-1,057 ms and 794
# ms (docs/benchmark_cpu.md, 2026-12-07).


def _pack_images(v):
  """``(..., n, H, W)`` real -> ``(..., n/2, H, W)`` complex: images ``j`` and
  ``n/2 + j`` as the real and imaginary parts of image ``j``."""
  half = v.shape[-3] // 2
  return jax.lax.complex(v[..., :half, :, :], v[..., half:, :, :])


def _unpack_images(z):
  """Inverse of :func:`_pack_images`."""
  return jnp.concatenate([jnp.real(z), jnp.imag(z)], axis=-3)


def _negate_frequencies(a, axes):
  """``a`` at ``-k`` along ``axes`` (FFT order: index ``j`` -> ``-j mod n``)."""
  return jnp.roll(jnp.flip(a, axes), (1,) * len(axes), axes)


def _hermitian_extension(s, width: int):
  """The symbol on the ``rfft2`` grid ``(..., H, width//2+1)`` -> the full
  ``fft2`` grid ``(..., H, width)``, with ``S(-k) = conj(S(k))`` for the
  columns the ``rfft2`` grid leaves out."""
  missing = s[..., 1:width - width // 2]
  return jnp.concatenate([s, jnp.conj(_negate_frequencies(missing, (-2,)))[..., ::-1]], axis=-1)


def _fold_to_rfft_grid(p, width: int):
  """``(P(k) + conj(P(-k))) / 2`` on the ``rfft2`` columns of a full-grid ``P``.

  With ``P = sum_pairs fft2(a + i b) conj(fft2(g_a + i g_b))`` this is
  ``sum_images V conj(G)`` of the images' real spectra, what the symbol's
  gradient needs (:func:`_spectral_filter_bwd`): the cross terms
  ``i (V_b conj(G_a) - V_a conj(G_b))`` are Hermitian and cancel.
  """
  both = (-2, -1)
  return (0.5 * (p + jnp.conj(_negate_frequencies(p, both))))[..., :width // 2 + 1]


def _transform_grid(s, width: int, packed: bool):
  """The symbol on the grid the filter's transforms use."""
  return _hermitian_extension(s, width) if packed else s


def _transform(v, packed: bool):
  """The filter's forward transform: ``rfft2``, or ``fft2`` of packed image pairs."""
  return jnp.fft.fft2(_pack_images(v)) if packed else jnp.fft.rfft2(v)


def _inverse(spec, shape, packed: bool):
  """Inverse of :func:`_transform` onto real images of ``shape = (H, W)``."""
  return _unpack_images(jnp.fft.ifft2(spec)) if packed else jnp.fft.irfft2(spec, s=shape)


def _forward(v, s, pairwise: bool, packed: bool):
  """``(A v, spectrum)`` with ``s`` on the transform grid (:func:`_transform_grid`)."""
  spec = _transform(v, packed)
  return _inverse(_apply_symbol(spec, s, pairwise), v.shape[-2:], packed), spec


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _spectral_filter(v, s_re, s_im, pairwise, packed=False):
  """``irfft2(S * rfft2(v))`` over the two minor axes of ``v``.

  Per channel, ``S = s_re + i s_im`` broadcasts against ``rfft2(v)``:
  :func:`heat_filter_channels_first` passes channels-first images ``(C, B,
  H, W)`` and ``S`` of shape ``(C, 1, H, W//2+1)``; NCHW images with ``S``
  of shape ``(C, H, W//2+1)`` work too. With ``pairwise``, ``v`` is NCHW
  ``(B, C_in, H, W)`` and ``S`` is ``(C_in, C_out, H, W//2+1)`` (``Y_o =
  sum_i S_io V_i``). With ``packed`` (per channel, an even number of images
  ``B``), images ``j`` and ``B/2 + j`` share one complex transform (see
  :func:`_pack_images`); the values are the same up to rounding.
  The backward pass is written out (:func:`_spectral_filter_bwd`) rather than
  left to JAX's transpose rules for ``rfft``/``irfft``, whose mask-and-scale
  fusions and extra copies cost time on CPU: the filter's forward+backward
  at 128 channels, batch 16 (``0.5 sum(y^2)`` loss, minimum of 5 calls in
  one process) took 3.11 s with JAX's rules and 2.02 s with this one at
  256^2, and 0.67 s vs 0.57 s at 128^2.
  """
  return _spectral_filter_fwd(v, s_re, s_im, pairwise, packed)[0]


def _spectral_filter_fwd(v, s_re, s_im, pairwise, packed=False):
  s = jax.lax.complex(s_re, s_im)
  out, spec = _forward(v, _transform_grid(s, v.shape[-1], packed), pairwise, packed)
  return out, (spec, s)


def _spectral_filter_bwd(pairwise, packed, residuals, g):
  """Adjoint of the real operator ``A = irfft2 . diag(S) . rfft2``.

  ``A`` is a real circulant operator (the discrete symbol is Hermitian, see
  :func:`discrete_symbol`), so ``A^T`` is the circulant with symbol
  ``conj(S)``: ``dL/dv = irfft2(conj(S) G)`` with ``G = rfft2(dL/dy)``. For the
  symbol, ``L`` sees ``S`` through ``<g, irfft2(S V)> = (1/N) sum_k w_k
  Re(S_k V_k conj(G_k))`` over the ``rfft`` grid (``N = H W``, ``w_k`` from
  :func:`_rfft_column_weights`), so with ``P = (w/N) sum_b V conj(G)``:
  ``dL/ds_re = Re P`` and ``dL/ds_im = -Im P``. Packed, the same ``G`` and
  ``P`` come from complex transforms of image pairs
  (:func:`_fold_to_rfft_grid`).
  """
  spec, s = residuals
  grad_v, p = _adjoint(spec, _transform_grid(s, g.shape[-1], packed), g, pairwise, packed)
  return (grad_v, *_symbol_gradient(p, g.shape[-2:], packed))


def _adjoint(spec, s, g, pairwise, packed):
  """``(dL/dv, sum_b V conj(G))`` for the images of ``g``: the backward pass
  of :func:`_spectral_filter_bwd` before ``P``'s weights (packed: on the
  full grid, before :func:`_fold_to_rfft_grid`)."""
  shape = g.shape[-2:]
  grad_spec = _transform(g, packed)
  if pairwise:
    grad_v = _inverse(jnp.einsum("bohw,iohw->bihw", grad_spec, jnp.conj(s)), shape, packed)
    return grad_v, jnp.einsum("bihw,bohw->iohw", spec, jnp.conj(grad_spec))
  grad_v = _inverse(grad_spec * jnp.conj(s), shape, packed)
  return grad_v, _reduce_to(spec * jnp.conj(grad_spec), s.shape)


def _symbol_gradient(p, shape, packed=False):
  """``(dL/ds_re, dL/ds_im)`` from the unweighted ``sum_b V conj(G)``."""
  height, width = shape
  if packed:
    p = _fold_to_rfft_grid(p, width)
  p = p * (_rfft_column_weights(width, jnp.finfo(p.dtype).dtype) / (height * width))
  return jnp.real(p), -jnp.imag(p)


_spectral_filter.defvjp(_spectral_filter_fwd, _spectral_filter_bwd)


# On CPU the filter's FFTs run in chunks of about this much spectrum. Two
# reasons. DUCC, XLA's CPU FFT library, allocates a scratch array as large
# as the whole spectrum for each 2-axis transform, on an Eigen worker thread;
# glibc maps every block over 32 MB fresh and returns it on free, so each
# call faults it in again (docs/benchmark_cpu.md, "where the mesh-free
# conv's time goes"). And a chunk about the size of the L2 caches stays in
# them from the rfft2 through the symbol to the irfft2. MFC layer fwd+bwd,
# 128 channels, batch 16, 2-core AMD EPYC (1 MiB L2 per core), seconds: at
# 256^2 5.06 unchunked, 4.11 in 16 MiB chunks, 3.45-4.13 in 4 MiB, 3.52-3.58
# in 0.5-2 MiB; at 128^2 1.37, 0.99, 0.81, 0.76-0.79 (docs/benchmark_cpu.md).
CPU_FFT_CHUNK_BYTES = 2 * 2 ** 20
# ... but only spectra above CPU_FFT_CHUNK_ABOVE_BYTES, on meshes of at least
# CPU_FFT_CHUNK_MIN_PIXELS. Inside a training step the loop costs copies into
# and out of the chunked layout, and on 64^2 meshes, whose FFTs are cheap,
# that cost won. MFC-ResNet steps, 4 levels, batch 16, chunked / unchunked
# time per round in one process (2026-12-04): at 64^2 the b16 step
# 1.02-1.11 and the MGE step 1.23-1.42 (coarse spectra of 8-27 MB chunked
# too); at 128^2 the b16 step 0.68-0.86, and the MGE step 1.04-1.33 with its
# 64^2 x 48 pass chunked but 0.88-1.14 without it (two runs; the same-program
# noise at 64^2 was 0.87-1.16).
CPU_FFT_CHUNK_ABOVE_BYTES = 64 * 2 ** 20
CPU_FFT_CHUNK_MIN_PIXELS = 128 * 128


def default_fft_chunk_bytes(spectrum_bytes: int, pixels: int) -> int:
  """The chunk size :func:`heat_filter` uses for this spectrum (bytes) and mesh (pixels).

  ``CPU_FFT_CHUNK_BYTES`` on the CPU backend for spectra above
  ``CPU_FFT_CHUNK_ABOVE_BYTES`` on meshes of at least
  ``CPU_FFT_CHUNK_MIN_PIXELS``, else 0 (no chunking). cuFFT has no such
  scratch cost, and a loop over chunks only adds launches.
  """
  if (jax.default_backend() != "cpu" or spectrum_bytes <= CPU_FFT_CHUNK_ABOVE_BYTES
      or pixels < CPU_FFT_CHUNK_MIN_PIXELS):
    return 0
  return CPU_FFT_CHUNK_BYTES


def fft_chunking(batch: int, channels: int, height: int, width: int, *,
                 pairwise: bool = False, chunk_bytes: int,
                 itemsize: int = 8) -> tuple[int, int] | None:
  """How :func:`heat_filter` splits its FFTs: ``(images, channels)`` per chunk.

  A per-channel filter runs on channels-first images (``(C, B, H, W)``, see
  :func:`heat_filter_channels_first`), so its chunks are consecutive there:
  ``m`` whole channels (all ``B`` images) when one channel's ``B`` planes fit
  in ``chunk_bytes`` of spectrum (a plane is ``H (W//2+1) itemsize`` bytes,
  ``itemsize`` of the complex dtype), ``m`` the largest divisor of
  ``channels`` that fits; otherwise ``g`` images of one channel, ``g`` the
  largest divisor of ``batch`` that fits (at least 1). ``pairwise`` filters
  mix all channels and run on NCHW images, so their chunks are ``g`` whole
  images. Returns ``None`` when the whole spectrum fits, or when
  ``chunk_bytes`` is 0 (chunking off).

  Example:
    >>> fft_chunking(16, 128, 256, 256, chunk_bytes=2 * 2 ** 20)   # 264 KB a plane
    (4, 1)
    >>> fft_chunking(16, 32, 64, 64, chunk_bytes=2 * 2 ** 20)      # 270 KB a channel
    (16, 4)
    >>> fft_chunking(16, 8, 64, 64, chunk_bytes=16 * 2 ** 20) is None
    True
  """
  if chunk_bytes < 0:
    raise ValueError(f"chunk_bytes must be >= 0 (0: no chunking), got {chunk_bytes}")
  plane = height * (width // 2 + 1) * itemsize
  if chunk_bytes == 0 or batch * channels * plane <= chunk_bytes:
    return None

  def largest_divisor(n, fits):
    return max((d for d in range(1, n + 1) if n % d == 0 and fits(d)), default=1)

  if pairwise:
    return largest_divisor(batch, lambda g: g * channels * plane <= chunk_bytes), channels
  if batch * plane <= chunk_bytes:
    return batch, largest_divisor(channels, lambda m: m * batch * plane <= chunk_bytes)
  return largest_divisor(batch, lambda g: g * plane <= chunk_bytes), 1


def _chunks(a, block0, block1, pairwise):
  """``(A0, A1, ...)`` -> ``(n, block0, block1, ...)`` without moving data.

  Chunk ``k`` holds block ``k // (A1 / block1)`` of the leading axis and
  block ``k % (A1 / block1)`` of the next; consecutive in memory, so
  ``block0 == 1`` or ``block1 == A1``. A per-channel chunk of one channel
  is ``(n, block1, ...)``: with an axis of size 1 in the chunks, XLA on CPU
  gave the loop's input a layout of its own and copied the whole array
  (128 MB per MFC layer at 128 channels, 256^2, batch 16) to undo it.
  """
  a0, a1 = a.shape[:2]
  n = (a0 // block0) * (a1 // block1)
  if block0 == 1 and not pairwise:
    return a.reshape(n, block1, *a.shape[2:])
  return a.reshape(n, block0, block1, *a.shape[2:])


# Chunks of ``block1 < B`` images of one channel are cut from rows
# ``(C B, H, W)`` with a dynamic slice, not from the stacked
# ``(C B / block1, block1, H, W)`` of :func:`_chunks`. Back from the stacked
# form, ``(C, B, H, W)`` is a reshape that neither splits nor merges whole
# axes, and XLA on CPU evaluated the transposes that read it (the layer's
# output to NHWC, the filter's input gradient to pixel-major) with
# per-element index arithmetic: 354 against 148 ms for the output's
# transpose at 128 channels, 256^2, batch 16. Other chunks (whole channels)
# stay stacked: there the stacked form is a plain split, and rows were
# 5-8% slower at 128^2 (``docs/benchmark_cpu.md``, 2026-12-06).


def _cuts_rows(shape, block0: int, block1: int) -> bool:
  """Whether per-channel chunks of ``shape = (C, B, H, W)`` are cut from rows."""
  return block0 == 1 and block1 < shape[1]


def _loop_carry(a, block0, block1):
  """The in-place loop's carry: rows ``(C B, H, W)`` or stacked chunks."""
  if _cuts_rows(a.shape, block0, block1):
    return a.reshape(-1, *a.shape[2:])
  return _chunks(a, block0, block1, pairwise=False)


def _num_chunks(a, block0, block1):
  return (a.shape[0] // block0) * (a.shape[1] // block1)


def _get_chunk(carry, k, block1, rows: bool):
  """Chunk ``k`` of :func:`_loop_carry`."""
  if rows:
    return jax.lax.dynamic_slice_in_dim(carry, k * block1, block1, axis=0)
  return jax.lax.dynamic_index_in_dim(carry, k, keepdims=False)


def _put_chunk(carry, chunk, k, rows: bool):
  """Writes chunk ``k`` back into :func:`_loop_carry`, in place."""
  if rows:
    return jax.lax.dynamic_update_slice_in_dim(carry, chunk, k * chunk.shape[0], axis=0)
  return jax.lax.dynamic_update_index_in_dim(carry, chunk, k, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_spectral_filter(v, s_re, s_im, pairwise, blocks, packed=False):
  """:func:`_spectral_filter`, its FFTs run chunk by chunk in a loop.

  ``blocks = (block0, block1)``: each chunk's extent along the two leading
  axes of ``v`` (:func:`_chunks`). Per channel, ``v`` is channels-first
  ``(C, B, H, W)``, ``S`` is ``(C, 1, H, W//2+1)`` and a chunk is ``block0``
  channels of ``block1`` images; pairwise, ``v`` is NCHW and a chunk is
  ``block0`` whole images. The chunks are consecutive, so splitting and
  merging are reshapes; a ``lax.scan`` runs them one after another, so that
  each FFT's scratch stays small (see ``CPU_FFT_CHUNK_BYTES``). Per channel
  a chunk's output has its input's shape and overwrites it in the loop
  carry (forward: ``v``'s chunks; backward: the cotangent's; see
  :func:`_loop_carry`), instead of
  filling a new stacked output: at 128 channels, 256^2, batch 16, XLA's
  temporary memory for the layer's fwd+bwd fell from 2,740 to 2,305 MB.
  Same values as :func:`_spectral_filter` (the symbol gradient is summed
  over the batch in another order). ``packed`` as there, for chunks of an
  even number of images: each chunk's images pair up within the chunk.
  """
  return _chunked_spectral_filter_fwd(v, s_re, s_im, pairwise, blocks, packed)[0]


def _symbol_block(s, k, per_block0, block0, pairwise):
  """The part of the symbol ``s`` that chunk ``k`` is filtered with (its
  channels), shaped to broadcast against the chunk (see :func:`_chunks`)."""
  if pairwise:
    return s
  block = jax.lax.dynamic_slice_in_dim(s, (k // per_block0) * block0, block0, axis=0)
  return block[0] if block0 == 1 else block


def _chunked_spectral_filter_fwd(v, s_re, s_im, pairwise, blocks, packed=False):
  """:func:`_spectral_filter_fwd` on each chunk; the chunks' spectra are the residuals."""
  block0, block1 = blocks
  per_block0 = v.shape[1] // block1
  s = jax.lax.complex(s_re, s_im)
  s_grid = _transform_grid(s, v.shape[-1], packed)

  def one_chunk(_, args):
    k, chunk = args
    out, spec = _forward(chunk, _symbol_block(s_grid, k, per_block0, block0, pairwise),
                         pairwise, packed)
    return None, (out, spec)

  rows = not pairwise and _cuts_rows(v.shape, block0, block1)

  def in_place(carry, k):
    _, (out, spec) = one_chunk(None, (k, _get_chunk(carry, k, block1, rows)))
    return _put_chunk(carry, out, k, rows), spec

  if pairwise:
    xs = _chunks(v, block0, block1, pairwise)
    _, (out, spec) = jax.lax.scan(one_chunk, None, (jnp.arange(xs.shape[0]), xs))
  else:
    out, spec = jax.lax.scan(in_place, _loop_carry(v, block0, block1),
                             jnp.arange(_num_chunks(v, block0, block1)))
  return out.reshape(v.shape[0], -1, *out.shape[-2:]), (spec, s)


def _chunked_spectral_filter_bwd(pairwise, blocks, packed, residuals, g):
  """:func:`_spectral_filter_bwd` chunk by chunk (:func:`_adjoint` on each);
  ``sum_b V conj(G)`` accumulates in the loop carry."""
  block0, block1 = blocks
  spec, s = residuals
  s = _transform_grid(s, g.shape[-1], packed)
  # A pairwise chunk is whole images: all of g's (output) channels.
  block1 = g.shape[1] if pairwise else block1
  per_block0 = g.shape[1] // block1

  def one_chunk(p, args):
    k, g_chunk, spec_chunk = args
    grad_v, p_chunk = _adjoint(spec_chunk, _symbol_block(s, k, per_block0, block0, pairwise),
                               g_chunk, pairwise, packed)
    if pairwise:
      return p + p_chunk, grad_v
    start = (k // per_block0) * block0
    p_chunk = p_chunk[None] if block0 == 1 else p_chunk
    block = jax.lax.dynamic_slice_in_dim(p, start, block0, axis=0) + p_chunk
    return jax.lax.dynamic_update_slice_in_dim(p, block, start, axis=0), grad_v

  rows = not pairwise and _cuts_rows(g.shape, block0, block1)

  def in_place(carry, k):
    buf, p = carry
    p, grad_v = one_chunk(p, (k, _get_chunk(buf, k, block1, rows),
                              jax.lax.dynamic_index_in_dim(spec, k, keepdims=False)))
    return (_put_chunk(buf, grad_v, k, rows), p), None

  if pairwise:
    gs = _chunks(g, block0, block1, pairwise)
    p, grad_v = jax.lax.scan(one_chunk, jnp.zeros_like(s), (jnp.arange(gs.shape[0]), gs, spec))
  else:
    (grad_v, p), _ = jax.lax.scan(in_place, (_loop_carry(g, block0, block1), jnp.zeros_like(s)),
                                  jnp.arange(_num_chunks(g, block0, block1)))
  return (grad_v.reshape(g.shape[0], -1, *grad_v.shape[-2:]),
          *_symbol_gradient(p, g.shape[-2:], packed))


_chunked_spectral_filter.defvjp(_chunked_spectral_filter_fwd, _chunked_spectral_filter_bwd)


def heat_filter_chunking(shape: tuple[int, int, int, int], *, out_channels: int | None = None,
                         pad: int = 0, dtype=jnp.float32,
                         fft_chunk_bytes: int | None = None) -> tuple[int, int] | None:
  """The FFT chunks :func:`heat_filter` uses for NHWC input of ``shape``.

  ``(images, input channels)`` per chunk, or ``None`` when the FFTs run
  unchunked. ``out_channels`` is ``C_out`` of a pairwise filter (``None``:
  per-channel); ``dtype`` is the input's (the FFTs run in float32 at
  least); ``pad`` and ``fft_chunk_bytes`` as in :func:`heat_filter`.
  :func:`heat_filter_channels_first` takes the same NHWC ``shape``.

  Example:
    >>> heat_filter_chunking((16, 256, 256, 128), fft_chunk_bytes=2 * 2 ** 20)
    (4, 1)
    >>> heat_filter_chunking((8, 64, 64, 32), out_channels=32, fft_chunk_bytes=2 * 2 ** 20)
    (2, 32)
  """
  batch, height, width, channels = shape
  ph, pw = height + 2 * pad, width + 2 * pad
  pairwise = out_channels is not None
  spectrum_channels = max(channels, out_channels) if pairwise else channels
  itemsize = 2 * jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
  if fft_chunk_bytes is None:
    fft_chunk_bytes = default_fft_chunk_bytes(
        batch * spectrum_channels * ph * (pw // 2 + 1) * itemsize, ph * pw)
  chunking = fft_chunking(batch, spectrum_channels, ph, pw, pairwise=pairwise,
                          chunk_bytes=fft_chunk_bytes, itemsize=itemsize)
  if chunking is None:
    return None
  # A pairwise chunk holds whole images: all of their input channels.
  return (chunking[0], channels) if pairwise else chunking


def _check_filter_args(raw, channels, pad, pairwise):
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}")
  expected = (channels, 7) if not pairwise else (channels, raw.shape[1], 7)
  if raw.shape != expected:
    raise ValueError(f"raw parameters of shape {raw.shape} do not fit {channels} "
                     f"input channels (expected {expected})")


def packs_images(images: int, *, pairwise: bool = False, pack_images: bool | None = None) -> bool:
  """Whether :func:`heat_filter` runs two images per complex transform.

  ``images`` is the number of images per transform (per FFT chunk when
  chunked, see :func:`heat_filter_chunking`). Only per-channel filters pack
  (a pairwise filter mixes channels, and its images do not share a
  symbol), only an even number of images, and with ``pack_images=None``
  only on the CPU backend, where it was measured faster (see
  :func:`_pack_images`); ``True`` or ``False`` overrides the backend.

  Example:
    >>> packs_images(16, pack_images=True), packs_images(3, pack_images=True)
    (True, False)
  """
  if pack_images is None:
    pack_images = jax.default_backend() == "cpu"
  return bool(pack_images) and not pairwise and images % 2 == 0


def _filter_minor_axes(x, raw, *, length_scale, pad, pairwise, fft_chunk_bytes,
                       pack_images=None):
  """The filter on the two minor axes of ``x``: per channel ``(C, B, H, W)``,
  pairwise ``(B, C_in, H, W)``; returns the same layout in ``x``'s dtype.

  The FFTs run in float32 at least (bfloat16 FFTs are not supported;
  float64 is kept), chunked as :func:`heat_filter_chunking` says.
  """
  height, width = x.shape[2:]
  channels, batch = (x.shape[1], x.shape[0]) if pairwise else x.shape[:2]
  dtype = x.dtype
  x = x.astype(jnp.promote_types(dtype, jnp.float32))
  chunking = heat_filter_chunking((batch, height, width, channels),
                                  out_channels=raw.shape[1] if pairwise else None, pad=pad,
                                  dtype=x.dtype, fft_chunk_bytes=fft_chunk_bytes)
  if pad:
    x = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ph, pw = height + 2 * pad, width + 2 * pad
  coeffs = coefficients(raw.astype(x.dtype), length_scale)
  s = discrete_symbol(coeffs, ph, pw, (1.0 / height, 1.0 / width))
  s = jnp.moveaxis(s, (0, 1), (-2, -1))           # (C..., ph, pw // 2 + 1)
  if not pairwise:
    s = s[:, None]                                # the same over the images axis
  packed = packs_images(batch if chunking is None else chunking[0], pairwise=pairwise,
                        pack_images=pack_images)
  if chunking is None:
    out = _spectral_filter(x, jnp.real(s), jnp.imag(s), pairwise, packed)
  else:
    # (images, channels) per chunk, as extents along x's two leading axes.
    blocks = tuple(chunking) if pairwise else tuple(chunking[::-1])
    out = _chunked_spectral_filter(x, jnp.real(s), jnp.imag(s), pairwise, blocks, packed)
  if pad:
    out = out[:, :, pad:pad + height, pad:pad + width]
  return out.astype(dtype)


def heat_filter_channels_first(v: jnp.ndarray, raw: jnp.ndarray, *, length_scale: float = 1.0,
                               pad: int = 0, fft_chunk_bytes: int | None = None,
                               pack_images: bool | None = None) -> jnp.ndarray:
  """The per-channel MFC filter on channels-first images ``(C, B, H, W)``.

  The layout the FFTs run in (XLA's FFT transforms minor axes), with every
  image of a channel in one block: :class:`MeshFreeConv`'s channel map
  writes it directly (:func:`channel_map_channels_first`), so no layout copy
  precedes the filter. Arguments as in :func:`heat_filter` (per channel
  only); returns ``(C, B, H, W)`` in ``v``'s dtype.

  Example:
    >>> raw = init_raw(jax.random.key(0), (3,))
    >>> v = jnp.ones((3, 2, 16, 16))
    >>> bool(jnp.allclose(heat_filter_channels_first(v, raw),
    ...                   heat_filter(v.transpose(1, 2, 3, 0), raw).transpose(3, 0, 1, 2)))
    True
  """
  if v.ndim != 4:
    raise ValueError(f"expected channels-first (C, B, H, W) images, got shape {v.shape}")
  _check_filter_args(raw, v.shape[0], pad, False)
  return _filter_minor_axes(v, raw, length_scale=length_scale, pad=pad, pairwise=False,
                            fft_chunk_bytes=fft_chunk_bytes, pack_images=pack_images)


def heat_filter(v: jnp.ndarray, raw: jnp.ndarray, *, length_scale: float = 1.0,
                pad: int = 0, pairwise: bool = False,
                fft_chunk_bytes: int | None = None,
                pack_images: bool | None = None) -> jnp.ndarray:
  """Applies the per-channel MFC filter to NHWC ``v`` through ``rfft2``.

  Args:
    v: ``(B, H, W, C)`` real images on the ``[0, 1]^2`` domain.
    raw: raw parameters ``(C, 7)``, or ``(C_in, C_out, 7)`` with ``pairwise``.
    length_scale: unit of the parametrisation (see :func:`coefficients`).
    pad: zero padding in pixels on each side (0: periodic boundaries). The
      padded mesh keeps the spacing ``1/H, 1/W``, so frequencies stay physical.
    pairwise: if True, output channel ``o`` is ``sum_i S_io * v_i`` (a full
      channel-mixing operator with 7 parameters per pair, the parameter count
      of the paper's MFC-ResNet / MFC-UNet); otherwise ``S_c * v_c``.
    fft_chunk_bytes: run the FFTs in sequential chunks of at most this much
      spectrum (:func:`fft_chunking`); 0 turns chunking off, ``None`` picks
      :func:`default_fft_chunk_bytes` (on CPU 2 MiB, for spectra over 64
      MiB on meshes from 128^2; off elsewhere). The result is the same. On
      CPU the layer's fwd+bwd at 128 channels, batch 16, ran 1.4x faster at
      256^2 and 1.8x at 128^2 (see ``CPU_FFT_CHUNK_BYTES``).
    pack_images: per channel, run images two to a complex transform
      (:func:`packs_images`: ``None`` packs on CPU, for an even number of
      images per transform). The result is the same up to rounding.

  Returns:
    ``(B, H, W, C)`` (``C_out`` with ``pairwise``), same dtype as ``v``.

  The FFTs run over the two minor axes of a channels-first copy
  (:func:`heat_filter_channels_first`; NCHW when ``pairwise``), as XLA's FFT
  transforms minor axes (``axes=(1, 2)`` would transpose too), and the
  backward pass is the closed-form adjoint of :func:`_spectral_filter_bwd`.
  """
  if v.ndim != 4:
    raise ValueError(f"expected NHWC images, got shape {v.shape}")
  if not pairwise:
    out = heat_filter_channels_first(jnp.transpose(v, (3, 0, 1, 2)), raw,
                                     length_scale=length_scale, pad=pad,
                                     fft_chunk_bytes=fft_chunk_bytes, pack_images=pack_images)
    return jnp.transpose(out, (1, 2, 3, 0))
  _check_filter_args(raw, v.shape[-1], pad, True)
  out = _filter_minor_axes(jnp.moveaxis(v, -1, 1), raw, length_scale=length_scale, pad=pad,
                           pairwise=True, fft_chunk_bytes=fft_chunk_bytes)
  return jnp.moveaxis(out, 1, -1)


@jax.custom_vjp
def channel_map_channels_first(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """A 1x1 channel map whose output is channels-first: ``(B, H, W, d) -> (c, B, H, W)``.

  ``y[o, b, h, w] = sum_i kernel[i, o] x[b, h, w, i]`` with ``kernel`` of
  shape ``(d, c)``: the matrix product ``kernel^T X^T`` with ``X`` the ``(B
  H W, d)`` pixels, so the filter after it needs no layout copy. The
  gradients are written out as ``dX = G^T kernel^T`` and ``dkernel = (G
  X)^T`` of the ``(c, B H W)`` cotangent ``G``: ``G X`` multiplies both
  operands as stored, where ``X^T G^T`` had XLA on CPU copy one of them.
  The MFC layer's fwd+bwd at 128 channels, 256^2, batch 16 took 0.90-0.96x
  the time with ``X^T G^T`` (0.99x at 128^2; same values bit for bit),
  which in turn beat JAX's own transpose rules (1.03x at 256^2, 1.11x at
  128^2) and the old NHWC channel map with a transposed copy (1.24x /
  1.02x; docs/benchmark_cpu.md, 2026-12-05 and 12-06).

  ``dX`` contracts ``G`` as a 2-D ``(c, B H W)`` array: XLA on CPU folds a
  2-D transpose into the product, but canonicalised the 4-D contraction
  into a transposed copy of ``G``. The product alone took 225-268 against
  294-311 ms (128 channels, 256^2, batch 16), the layer's fwd+bwd 0.96x
  (256^2, 8 process pairs) and 0.98x (128^2, 3 pairs;
  docs/benchmark_cpu.md, 2026-12-07). The forward product keeps its copy
  of ``X``: with ``X`` as a transposed 2-D operand XLA's GEMM took 1.7-2.6
  s, the copy and product 0.4-1.4 s.

  Example:
    >>> x, k = jnp.ones((2, 4, 4, 3)), jnp.ones((3, 5))
    >>> channel_map_channels_first(x, k).shape
    (5, 2, 4, 4)
  """
  return jax.lax.dot_general(kernel, x, (((0,), (x.ndim - 1,)), ((), ())))


def _channel_map_fwd(x, kernel):
  return channel_map_channels_first(x, kernel), (x, kernel)


def _channel_map_bwd(residuals, g):
  x, kernel = residuals
  pixels = tuple(range(x.ndim - 1))
  # Both transposes of the small kernel sit behind optimization barriers:
  # without them XLA folds them into the products' operand order and is
  # back at the forms that copy or transpose the big operands.
  kernel_t = jax.lax.optimization_barrier(kernel.T)
  # G as 2-D (c, B H W): XLA folds that transpose into the GEMM; the 4-D
  # contraction got a transposed copy of G first.
  dx = jax.lax.dot_general(g.reshape(g.shape[0], -1), kernel_t, (((0,), (0,)), ((), ())))
  dx = dx.reshape(x.shape)
  dkernel_t = jax.lax.dot_general(g, x, ((tuple(p + 1 for p in pixels), pixels), ((), ())))
  return dx, jax.lax.optimization_barrier(dkernel_t).T


channel_map_channels_first.defvjp(_channel_map_fwd, _channel_map_bwd)


class _ChannelMap(nn.Module):
  """``nn.Dense``'s parameters (same names, shapes and initialisers) with a
  channels-first output (:func:`channel_map_channels_first`).

  Returns ``(kernel^T X^T, bias)``, the bias (``None`` without one) not yet
  added: :class:`MeshFreeConv` adds it where it costs least.
  """

  features: int
  use_bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return channel_map_channels_first(x, kernel), bias


def init_raw(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32,
             *, width: float = 1.0, jitter: float = 0.1,
             gain: float = 1.0) -> jnp.ndarray:
  """Initial raw parameters ``shape + (7,)`` for filters of width ~ ``width`` units.

  ``tau = 1/2``, ``alpha ~ width^2 I`` (so ``sqrt(2 tau a) ~ width``), random
  orientation and lobes of order one: ``g0 ~ N(0, 1)`` and ``gx, gy ~ N(0,
  1/2)``, all jittered so that channels start different. ``gain`` scales
  the ``gamma`` draws (``1/sqrt(fan_in)`` for pairwise filters, whose outputs
  sum over input channels).
  """
  k1, k2 = jax.random.split(key)
  base = jnp.array([math.log(0.5), math.log(width), 0.0, math.log(width), 0.0, 0.0, 0.0],
                   dtype)
  noise = jitter * jax.random.normal(k1, shape + (4,), dtype)
  gammas = jax.random.normal(k2, shape + (3,), dtype) * (gain * jnp.array([1.0, 0.5, 0.5], dtype))
  return base + jnp.concatenate([noise, gammas], axis=-1)


class MeshFreeConv(nn.Module):
  """Mesh-free convolution: 1x1 channel map ``R`` then the heat-equation filter.

  Maps ``(B, H, W, d)`` to ``(B, H, W, features)`` for any ``H, W``; the
  parameters do not depend on the mesh. Per channel, ``R`` writes
  channels-first ``(features, B, H, W)`` (:func:`channel_map_channels_first`),
  the layout the filter's FFTs run in, and only the output is transposed
  back; ``R``'s parameters are ``nn.Dense``'s (``channel_map/kernel`` of
  shape ``(d, features)`` and ``channel_map/bias``). On a periodic mesh the
  bias is added after the filter, as ``b g0`` (:meth:`folds_bias`).

  Attributes:
    features: output channels ``c``.
    length_scale: unit (fraction of the image side) of the filter width and of
      ``gx, gy``; the initial filters are about this wide. Default 1/16.
    padding: zero padding on each side as a fraction of the image side (0:
      periodic boundaries, the paper's setting). A fraction, not pixels, so the
      operator stays the same on every mesh.
    pairwise: 7 symbol parameters per (input, output) channel pair instead of
      per channel; ``R`` then maps ``d -> d``. This is the parametrisation
      whose parameter count matches the paper's MFC-ResNet (532,163) and
      MFC-UNet; it costs a ``d x c`` complex contraction per frequency. On
      this 2-core CPU a ResNet fwd+bwd step (batch 8, 32^2) took 2.93 s
      pairwise, 0.93 s with 3x3 convs and 0.35 s per-channel (same run).
    use_bias: bias of ``R``.
    dtype: compute dtype of ``R`` and of the output (``None``: from the
      input and params). The filter's FFTs always run in float32 at least.
    fft_chunk_bytes: see :func:`heat_filter` (``None``: on CPU, 2 MiB
      chunks of spectra over 64 MiB on meshes from 128^2; none elsewhere).
    pack_images: see :func:`heat_filter` (``None``: two images to a
      complex transform on CPU).
  """

  features: int
  length_scale: float = 1.0 / 16
  padding: float = 0.0
  pairwise: bool = False
  use_bias: bool = True
  dtype: Any = None
  fft_chunk_bytes: int | None = None
  pack_images: bool | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim != 4:
      raise ValueError(f"MeshFreeConv expects NHWC images, got shape {x.shape}")
    if not (isinstance(self.features, int) and self.features >= 1):
      raise ValueError(f"features must be a positive integer, got {self.features!r}")
    if not 0.0 <= self.padding <= 1.0:
      raise ValueError(f"padding is a fraction of the image side in [0, 1], got {self.padding}")
    if self.length_scale <= 0:
      raise ValueError(f"length_scale must be positive, got {self.length_scale}")
    pad = self.padding_pixels(x.shape[1], x.shape[2])
    if self.pairwise:
      d = x.shape[-1]
      v = nn.Dense(d, use_bias=self.use_bias, dtype=self.dtype, name="channel_map")(x)
      raw = self.param("symbol", lambda k, s: init_raw(k, s, gain=1.0 / math.sqrt(d)),
                       (d, self.features))
      return heat_filter(v, raw, length_scale=self.length_scale, pad=pad, pairwise=True,
                         fft_chunk_bytes=self.fft_chunk_bytes)
    # Channels-first between the channel map and the filter: the map's GEMM
    # writes that layout, so only the output is transposed back to NHWC.
    v, bias = _ChannelMap(self.features, self.use_bias, self.dtype, name="channel_map")(x)
    raw = self.param("symbol", init_raw, (self.features,))
    fold = self.folds_bias(x.shape[1], x.shape[2])   # False without a bias
    if bias is not None and not fold:
      v = v + bias[:, None, None, None]
    out = heat_filter_channels_first(v, raw, length_scale=self.length_scale, pad=pad,
                                     fft_chunk_bytes=self.fft_chunk_bytes,
                                     pack_images=self.pack_images)
    out = jnp.transpose(out, (1, 2, 3, 0))
    if fold:
      # A (v + b) = A v + b S(0), and S(0) = g0 (Eq. 21 at k = 0): the bias
      # joins the output's transpose instead of costing a pass over v.
      out = out + (bias * coefficients(raw.astype(bias.dtype), self.length_scale).g0
                   ).astype(out.dtype)
    return out

  def padding_pixels(self, height: int, width: int) -> int:
    """The zero padding, in pixels on each side, on an ``height x width`` mesh."""
    return int(round(self.padding * max(height, width)))

  def folds_bias(self, height: int, width: int) -> bool:
    """Whether the channel map's bias is added after the filter, as ``b g0``.

    A per-channel filter on a periodic mesh maps a constant image ``b`` to
    ``b S(0)``, and ``S(0) = g0`` (Eq. 21 at ``k = 0``; the Nyquist
    averages of :func:`discrete_symbol` leave ``k = 0`` alone), so ``A(v +
    b) = A v + b g0`` up to rounding. Zero padding breaks the constant, and
    pairwise filters take their bias from ``nn.Dense``: there the bias is
    added to ``v``. It saves a pass over ``v``: 0.989-0.994x the layer's
    fwd+bwd at 128 channels, 128^2, batch 16 on CPU; no difference beyond
    the noise at 256^2 (``docs/benchmark_cpu.md``, 2026-12-07).
    """
    return self.use_bias and not self.pairwise and self.padding_pixels(height, width) == 0

  def fft_chunking(self, input_shape: tuple[int, int, int, int],
                   dtype=jnp.float32) -> tuple[int, int] | None:
    """The FFT chunks this layer's filter runs for NHWC input of ``input_shape``.

    What :func:`heat_filter_chunking` gives for the filter's input, the
    channel map's ``(B, H, W, d or features)`` output in ``dtype`` (the
    input's; this layer's ``dtype`` wins when set). Needs no parameters.

    Example:
      >>> MeshFreeConv(128, fft_chunk_bytes=2 * 2 ** 20).fft_chunking((16, 256, 256, 32))
      (4, 1)
    """
    batch, height, width, channels = input_shape
    mid = channels if self.pairwise else self.features
    return heat_filter_chunking(
        (batch, height, width, mid), out_channels=self.features if self.pairwise else None,
        pad=self.padding_pixels(height, width),
        dtype=self.dtype if self.dtype is not None else dtype,
        fft_chunk_bytes=self.fft_chunk_bytes)

  def packs_images(self, input_shape: tuple[int, int, int, int],
                   dtype=jnp.float32) -> bool:
    """Whether this layer's filter runs two images per complex FFT for NHWC
    input of ``input_shape`` (:func:`packs_images` with the images per
    transform of :meth:`fft_chunking`). Needs no parameters.

    Example:
      >>> MeshFreeConv(8, pack_images=True).packs_images((16, 64, 64, 3))
      True
    """
    chunking = self.fft_chunking(input_shape, dtype)
    return packs_images(input_shape[0] if chunking is None else chunking[0],
                        pairwise=self.pairwise, pack_images=self.pack_images)


def mesh_free_conv(features: int, kernel_size: int | None = None, *,
                   name: str | None = None, **kwargs) -> MeshFreeConv:
  """Conv-factory entry (see :mod:`mgtrain.nn.convs`): ``kernel_size`` is ignored.

  A mesh-free conv has no stencil; its width is learned (``tau``, ``alpha``).
  """
  del kernel_size
  return MeshFreeConv(features, name=name, **kwargs)
