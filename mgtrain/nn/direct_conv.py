"""A direct convolution whose kernel gradient is itself a forward convolution.

For an NHWC input ``x``, an HWIO kernel ``w``, strides ``(s_h, s_w)`` and
explicit padding, the convolution and its kernel gradient are

  y[n, h, w, o]       = sum_{ky, kx, i} x~[n, s_h h + ky, s_w w + kx, i] w[ky, kx, i, o]
  dL/dw[ky, kx, i, o] = sum_{n, h, w}   x~[n, s_h h + ky, s_w w + kx, i] dy[n, h, w, o]

where ``x~`` is the padded input. The second line is a forward convolution
too, with the roles swapped: the input channels ``i`` act as the batch, the
samples ``n`` as the channels being contracted, and ``dy`` as a kernel of
``H_out x W_out`` taps dilated by the strides. :func:`direct_conv` is
``lax.conv_general_dilated`` with a custom VJP that computes it in exactly
that form, ``conv(x~ as (I, H, W, N), dy as (H_out, W_out, N, O))`` in
NHWC / HWIO, and transposes the ``(I, kh, kw, O)`` result to HWIO. The
input gradient of a stride-1 convolution is JAX's own (a convolution with
the flipped kernel). JAX writes that of a strided one as a convolution of
``dy`` dilated by the strides, which mostly multiplies zeros;
:func:`input_gradient` splits it by output phase instead ("sub-pixel"):
per axis, with ``i = s m + p`` and ``lo`` the low padding,

  dL/dx[n, s m + p, ...] = sum_{a = s d + p + lo, 0 <= a < k} dy[n, m - d, ...] w[a, ...]^T

a stride-1 convolution of ``dy`` with a ``ceil(k / s)``-tap kernel for each
of the ``s_h s_w`` phases. All phases are one convolution with ``s_h s_w I``
output channels, interleaved into the mesh afterwards (depth to space).

Why: JAX's own transpose rule emits the kernel gradient as a convolution
with unusual dimension numbers, which XLA's CPU compiler rewrites into the
same canonical form before it calls Eigen's convolution. Inside a
``while`` loop body (``lax.fori_loop``, ``lax.scan``), it does not: there
the kernel gradient runs as XLA's naive single-threaded loop nest. In the
UNet's fwd+bwd over 4 x 60 images at 64^2, rolled as a ``fori_loop``, the
kernel gradients of its four direct convolutions (the 3 -> 32 input conv,
the 32 -> 3 output conv and the two stride-2 downsamplings) took
1.6-2.6 s each per call, and the loop ran 3x slower than the unrolled
chunks (40.1 s against 13.8 s). Written as a forward convolution, the
rolled loop ran as fast as the unrolled one (12.53 s against 13.16 s, one
process, interleaved rounds), and compiled in 17 s instead of 44 s. The
values are the same: XLA computes both forms with the same convolution.
That is what lets :func:`mgtrain.mge.sum_over_chunks` roll its chunks
(``docs/benchmark_cpu.md``, 2026-12-05, sixth session).

A strided input gradient has the same trouble in a loop body: the UNet's
128^2 -> 64^2 downsampling (32 channels) took 180.6 ms for 16 one-image
chunks as a ``fori_loop`` against 17.5 ms unrolled, and 11.1 ms in the loop
by phases (12 chunks of 4 x 64^2: 129.4 ms against 8.5 ms by phases; one
process, 2026-12-07). So under :func:`kernel_gradients_as_forward_convs`
the input gradient of a strided convolution is :func:`input_gradient`.

Outside loops XLA's own form is as fast or faster: there the ResNet's steps
ran within 1-2% either way, and the UNet's MGE step, with many small direct
convs on its coarse meshes, ran 0.7-3.9% slower with the custom VJP in three
A/Bs. So the custom VJP is taken only while a loop body is being traced
under :func:`kernel_gradients_as_forward_convs` (which
:func:`mgtrain.mge.sum_over_chunks` enters for its rolled loop); elsewhere
:func:`direct_conv` is ``lax.conv_general_dilated`` itself. The choice is
made when the forward call is traced, so it holds for a ``jax.grad`` or
``jax.value_and_grad`` taken inside the loop body, the case of a chunk's
pass. (Those A/Bs were of the kernel gradient. The input gradient by phases
alone was faster outside loops too, 0.42-0.56x on the UNet's bigger
downsamplings, but a few milliseconds a step; whole steps were not timed
with it there, so outside loops it is not taken.)

Only the plain case takes the custom VJP: NHWC / HWIO / NHWC, no input or
kernel dilation, one feature and batch group, operands of one dtype and no
other ``preferred_element_type``. Everything else is passed to
``lax.conv_general_dilated`` unchanged.

Example:
  >>> import jax, jax.numpy as jnp
  >>> x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  >>> dn = ("NHWC", "HWIO", "NHWC")
  >>> direct_conv(x, w, (2, 2), "SAME", dimension_numbers=dn).shape
  (2, 4, 4, 4)
  >>> loss = lambda w: jnp.sum(direct_conv(x, w, (1, 1), "SAME", dimension_numbers=dn))
  >>> with kernel_gradients_as_forward_convs():   # what a rolled loop's body is traced under
  ...   g = jax.grad(loss)(w)
  >>> float(g[1, 1, 0, 0])   # every tap of the centre sees all 2 x 64 pixels
  128.0
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np

_NHWC = ("NHWC", "HWIO", "NHWC")

# Read when a conv is traced; tracing happens in the calling thread, so a
# context variable scopes it to the loop body being traced.
_AS_FORWARD_CONVS = contextvars.ContextVar("kernel_gradients_as_forward_convs", default=False)


@contextlib.contextmanager
def kernel_gradients_as_forward_convs(enabled: bool = True):
  """While tracing under this, :func:`direct_conv` takes its custom VJP.

  Enter it around the tracing of a loop body (``lax.fori_loop``,
  ``lax.scan``) whose passes differentiate direct convolutions, as
  :func:`mgtrain.mge.sum_over_chunks` does. Nested uses restore the outer
  setting on exit.
  """
  token = _AS_FORWARD_CONVS.set(enabled)
  try:
    yield
  finally:
    _AS_FORWARD_CONVS.reset(token)


def _is_plain(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
              batch_group_count, preferred_element_type) -> bool:
  if jnp.ndim(lhs) != 4 or jnp.ndim(rhs) != 4 or dimension_numbers is None:
    return False
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if dn != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC):
    return False
  undilated = all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  return (undilated and feature_group_count == 1 and batch_group_count == 1
          and lhs.dtype == rhs.dtype and preferred_element_type in (None, lhs.dtype))


def _explicit_padding(lhs_shape, rhs_shape, window_strides, padding):
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], window_strides, padding)
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def kernel_gradient(x, dy, kernel_size, window_strides, padding, precision=None):
  """``dL/dw`` (HWIO) of an NHWC convolution, from its input and output cotangent.

  Args:
    x: ``(N, H, W, I)`` the convolution's input.
    dy: ``(N, H_out, W_out, O)`` the cotangent of its output.
    kernel_size: ``(kh, kw)``.
    window_strides: ``(s_h, s_w)``.
    padding: explicit ``((lo_h, hi_h), (lo_w, hi_w))`` (negative crops).
    precision: passed to the convolution.

  Returns:
    ``(kh, kw, I, O)``, computed as the forward convolution of the module
    docstring.
  """
  (kh, kw), (sh, sw) = kernel_size, window_strides
  _, ho, wo, _ = dy.shape
  zero = jnp.zeros((), x.dtype)
  x = jax.lax.pad(x, zero, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
  # Rows and columns past the last window's reach never meet a tap.
  x = x[:, :sh * (ho - 1) + kh, :sw * (wo - 1) + kw]
  out = jax.lax.conv_general_dilated(
      jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), (1, 1), "VALID",
      rhs_dilation=(sh, sw), dimension_numbers=_NHWC, precision=precision)
  return jnp.transpose(out, (1, 2, 0, 3))   # (I, kh, kw, O) -> (kh, kw, I, O)


def _phase_taps(size: int, kernel: int, stride: int, lo: int, out_size: int):
  """One axis of :func:`input_gradient`: which kernel tap each phase takes.

  Returns ``(taps, pad_lo, pad_hi, phase_len)``: ``taps[p][t]`` is the
  kernel index ``a`` that phase ``p`` applies at offset ``t`` of the padded
  ``dy`` (``-1``: none); ``dy`` padded by ``(pad_lo, pad_hi)`` (negative
  crops) gives ``phase_len = ceil(size / stride)`` outputs per phase.
  """
  phase_len = -(-size // stride)
  offsets = [(a - p - lo) // stride for p in range(stride) for a in range(kernel)
             if (a - p - lo) % stride == 0]
  d_min, d_max = min(offsets), max(offsets)
  taps = [[stride * (d_max - t) + p + lo for t in range(d_max - d_min + 1)]
          for p in range(stride)]
  taps = [[a if 0 <= a < kernel else -1 for a in row] for row in taps]
  return taps, d_max, (phase_len - 1 - d_min) - (out_size - 1), phase_len


def input_gradient(dy, w, input_size, window_strides, padding, precision=None):
  """``dL/dx`` of an NHWC convolution, by output phases (the module docstring).

  Args:
    dy: ``(N, H_out, W_out, O)`` the cotangent of the convolution's output.
    w: ``(kh, kw, I, O)`` its kernel (HWIO).
    input_size: ``(H, W)`` of its input.
    window_strides: ``(s_h, s_w)``.
    padding: explicit ``((lo_h, hi_h), (lo_w, hi_w))`` (negative crops).
    precision: passed to the convolution.

  Returns:
    ``(N, H, W, I)``, what ``jax.vjp`` of ``lax.conv_general_dilated`` gives,
    from one stride-1 convolution of ``dy`` into ``s_h s_w I`` channels and a
    depth-to-space interleave.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x, w, dy = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 4)), jnp.ones((1, 4, 4, 4))
    >>> conv = lambda x: jax.lax.conv_general_dilated(
    ...     x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> bool(jnp.allclose(input_gradient(dy, w, (8, 8), (2, 2), ((1, 1), (1, 1))),
    ...                   jax.vjp(conv, x)[1](dy)[0]))
    True
  """
  (kh, kw, ci, co), (sh, sw) = w.shape, window_strides
  n, ho, wo, _ = dy.shape
  (h, wd), ((lo_h, _), (lo_w, _)) = input_size, padding
  taps_h, lo_pad_h, hi_pad_h, mh = _phase_taps(h, kh, sh, lo_h, ho)
  taps_w, lo_pad_w, hi_pad_w, mw = _phase_taps(wd, kw, sw, lo_w, wo)
  # A zero tap at index k stands for "none", so one gather builds every phase's kernel.
  wz = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0)))
  index_h = np.where(np.asarray(taps_h) < 0, kh, taps_h)          # (s_h, T_h)
  index_w = np.where(np.asarray(taps_w) < 0, kw, taps_w)          # (s_w, T_w)
  k = wz[index_h[:, :, None, None], index_w[None, None, :, :]]    # (s_h, T_h, s_w, T_w, I, O)
  k = jnp.transpose(k, (1, 3, 5, 0, 2, 4)).reshape(index_h.shape[1], index_w.shape[1], co,
                                                   sh * sw * ci)
  dyp = jax.lax.pad(dy, jnp.zeros((), dy.dtype),
                    ((0, 0, 0), (lo_pad_h, hi_pad_h, 0), (lo_pad_w, hi_pad_w, 0), (0, 0, 0)))
  out = jax.lax.conv_general_dilated(dyp, k.astype(dy.dtype), (1, 1), "VALID",
                                     dimension_numbers=_NHWC, precision=precision)
  out = out.reshape(n, mh, mw, sh, sw, ci).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(n, mh * sh, mw * sw, ci)[:, :h, :wd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _plain_conv(lhs, rhs, window_strides, padding, precision):
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                      dimension_numbers=_NHWC, precision=precision)


def _plain_conv_fwd(lhs, rhs, window_strides, padding, precision):
  return _plain_conv(lhs, rhs, window_strides, padding, precision), (lhs, rhs)


def _plain_conv_bwd(window_strides, padding, precision, residuals, dy):
  lhs, rhs = residuals
  if window_strides == (1, 1):
    _, input_vjp = jax.vjp(
        lambda x: jax.lax.conv_general_dilated(x, rhs, window_strides, padding,
                                               dimension_numbers=_NHWC, precision=precision),
        lhs)
    dx = input_vjp(dy)[0]
  else:
    dx = input_gradient(dy, rhs, lhs.shape[1:3], window_strides, padding, precision)
  dw = kernel_gradient(lhs, dy, rhs.shape[:2], window_strides, padding, precision)
  return dx.astype(lhs.dtype), dw.astype(rhs.dtype)


_plain_conv.defvjp(_plain_conv_fwd, _plain_conv_bwd)


def direct_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` (same arguments, same values). Under
  :func:`kernel_gradients_as_forward_convs`, the kernel gradient of the plain
  NHWC case is computed by :func:`kernel_gradient`."""
  if not (_AS_FORWARD_CONVS.get()
          and _is_plain(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                        feature_group_count, batch_group_count, preferred_element_type)):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  return _plain_conv(lhs, rhs, tuple(int(s) for s in window_strides),
                     _explicit_padding(lhs.shape, rhs.shape, window_strides, padding), precision)


__all__ = ["direct_conv", "input_gradient", "kernel_gradient", "kernel_gradients_as_forward_convs"]
