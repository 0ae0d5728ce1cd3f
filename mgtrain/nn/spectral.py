"""FNO-style spectral convolution (Li et al., Fourier Neural Operator).

The layer keeps the lowest ``modes x modes`` Fourier modes of each input
channel and mixes channels with a learned complex matrix per mode:

  v_o(k) = sum_i W_io(k) u_i(k)    for |k_y| < modes, 0 <= k_x < modes,
  v_o(k) = 0                       otherwise,

then returns ``irfft2(v) + b`` plus, by default, the FNO layer's pointwise
bypass ``sum_i P_io u_i`` (a 1x1 conv). Modes are counted in the physical
frequencies of the ``[0, 1]^2`` domain, so the layer is defined on every mesh;
a mesh too coarse to hold ``modes`` frequencies uses the ones it has (the
weights of the missing modes get no gradient there).

This is the spectral convolution of the FNO-ESPCN comparison in the MFC
paper (Appendix D, Table 8). Unlike a mesh-free conv it truncates: it cannot
represent a local stencil, which is why the paper's MFC-ESPCN beats it.

Example:
  >>> import jax, jax.numpy as jnp
  >>> layer = SpectralConv(8, modes=6)
  >>> params = layer.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> layer.apply(params, jnp.ones((2, 16, 16, 3))).shape
  (2, 16, 16, 8)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def spectral_mix(u: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
  """Applies complex per-mode channel mixing to NHWC ``u``.

  Args:
    u: ``(B, H, W, C_in)`` real.
    weights: complex ``(2, modes, modes, C_in, C_out)``: block 0 acts on the
      non-negative ``k_y`` rows ``0..modes-1``, block 1 on the negative rows
      ``-modes..-1``; both on columns ``0..modes-1`` of ``rfft2``.

  Returns:
    ``(B, H, W, C_out)`` real.
  """
  _, height, width, _ = u.shape
  modes = weights.shape[1]
  my = min(modes, height // 2)             # rows per sign that the mesh holds
  mx = min(modes, width // 2 + 1)
  spec = jnp.fft.rfft2(u.astype(jnp.promote_types(u.dtype, jnp.float32)), axes=(1, 2))
  out = jnp.zeros(spec.shape[:3] + (weights.shape[-1],), spec.dtype)
  low = jnp.einsum("bhwi,hwio->bhwo", spec[:, :my, :mx], weights[0, :my, :mx])
  out = out.at[:, :my, :mx].set(low)
  if my > 0:
    high = jnp.einsum("bhwi,hwio->bhwo", spec[:, height - my:, :mx],
                      weights[1, modes - my:, :mx])
    out = out.at[:, height - my:, :mx].set(high)
  return jnp.fft.irfft2(out, s=(height, width), axes=(1, 2)).astype(u.dtype)


class SpectralConv(nn.Module):
  """FNO layer ``u -> irfft2(W . rfft2(u))[truncated] + P u + b``.

  Attributes:
    features: output channels.
    modes: Fourier modes kept per axis (per sign along ``y``).
    bypass: add the FNO layer's pointwise linear path ``P u`` (a 1x1 conv).
    dtype: compute dtype of the input, the bypass and the output (``None``:
      the input's); the FFTs run in float32 at least.
  """

  features: int
  modes: int = 12
  bypass: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim != 4:
      raise ValueError(f"SpectralConv expects NHWC images, got shape {x.shape}")
    if self.modes < 1:
      raise ValueError(f"modes must be >= 1, got {self.modes}")
    if self.dtype is not None:
      x = x.astype(self.dtype)
    c_in = x.shape[-1]
    scale = 1.0 / (c_in * self.features)
    shape = (2, self.modes, self.modes, c_in, self.features)

    def init(key, shape):
      kr, ki = jax.random.split(key)
      return scale * jnp.stack([jax.random.uniform(kr, shape), jax.random.uniform(ki, shape)], -1)

    w = self.param("weights", init, shape)   # real/imag on the last axis
    y = spectral_mix(x, jax.lax.complex(w[..., 0], w[..., 1]))
    if self.bypass:
      y = y + nn.Dense(self.features, use_bias=False, dtype=self.dtype, name="bypass")(x)
    return y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(y.dtype)


def spectral_conv(features: int, kernel_size: int | None = None, *,
                  name: str | None = None, modes: int | None = None,
                  **kwargs) -> SpectralConv:
  """Conv-factory entry (see :mod:`mgtrain.nn.convs`).

  ``modes`` defaults to 12, the FNO paper's choice; ``kernel_size`` is ignored
  (a spectral conv has no stencil).
  """
  del kernel_size
  return SpectralConv(features, modes=12 if modes is None else modes, name=name, **kwargs)

