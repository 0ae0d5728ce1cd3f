"""The reference denoising ResNet of the MGE paper (597,699 parameters).

Architecture (DESIGN.md section 2, the authors' code):

* ``1x1 conv 3 -> 128``;
* 2 residual blocks, each
  ``x <- x + conv3x3(leaky_relu_0.2(layer_norm_CHW(conv3x3(x) + emb(t))))``
  where ``emb(t)`` = 64 sinusoidal features (32 frequencies) ++ an MLP
  ``1 -> 32 -> 32 -> 64`` of t, broadcast over the mesh, and the layer norm
  normalises over (C, H, W) with no affine parameters;
* ``1x1 conv 128 -> 3`` whose initial weights are scaled by 1e-3, so the
  untrained network outputs almost zero.

The network predicts the clean image. Every conv is made by the ``conv``
factory, so a mesh-free variant is the same code with another factory.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = ResNet()
  >>> x, t = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,))
  >>> params = model.init(jax.random.key(0), x, t)
  >>> count_params(params)
  597699
  >>> model.apply(params, x, t).shape
  (2, 16, 16, 3)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgtrain.nn.convs import dispatched_conv_kwargs, standard_conv, with_dtype
from mgtrain.nn.embeddings import TimeEmbedding


def layer_norm_chw(x: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
  """Layer norm over (H, W, C) per sample, no affine (``F.layer_norm(x, x.shape[1:])``).

  Statistics are taken in float32 at least (a bfloat16 mean over 128 x H x W
  values would lose most of its digits); the result has ``x``'s dtype.
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axis=(1, 2, 3), keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 3), keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _scaled_init(base, scale: float):
  def init(key, shape, dtype=jnp.float32):
    return scale * base(key, shape, dtype)
  return init


class ResBlock(nn.Module):
  features: int
  conv: Callable[..., nn.Module] = standard_conv
  dtype: Any = None

  @nn.compact
  def __call__(self, x, t):
    conv = with_dtype(self.conv, self.dtype)
    h = conv(self.features, 3, name="conv_0")(x)
    # The embedding is computed in float32 (sin(1000 t) needs t's digits) and
    # cast, so that adding it does not promote a bfloat16 block to float32.
    h = h + TimeEmbedding(name="time")(t)[:, None, None, :h.shape[-1]].astype(h.dtype)
    h = nn.leaky_relu(layer_norm_chw(h), 0.2)
    return x + conv(self.features, 3, name="conv_1")(h)


class ResNet(nn.Module):
  """Time-conditioned residual denoiser; ``apply(params, u, t) -> y_hat``.

  Attributes:
    features: hidden channels (128 in the reference).
    blocks: number of residual blocks (2).
    out_channels: output channels (3).
    conv: conv factory for every spatial conv (see :mod:`mgtrain.nn.convs`).
    dtype: compute dtype (``None``: float32). ``jnp.bfloat16`` runs every
      conv and activation in bfloat16 while the parameters, the time
      embedding and the layer-norm statistics stay float32 (Flax's
      ``dtype`` / ``param_dtype`` split): the same params tree, so a
      float32 checkpoint loads into a bfloat16 model and back.
  """

  features: int = 128
  blocks: int = 2
  out_channels: int = 3
  conv: Callable[..., nn.Module] = standard_conv
  dtype: Any = None

  @nn.compact
  def __call__(self, u, t):
    if u.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {u.shape}")
    if self.features != 128:
      # The time embedding has 2*32 + 64 = 128 features by construction.
      raise ValueError("the reference time embedding has 128 features; "
                       f"features={self.features} is not supported")
    x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="lift",
                **dispatched_conv_kwargs())(u)
    for i in range(self.blocks):
      x = ResBlock(self.features, self.conv, self.dtype, name=f"block_{i}")(x, t)
    return nn.Conv(
        self.out_channels, (1, 1), dtype=self.dtype, name="project", **dispatched_conv_kwargs(),
        kernel_init=_scaled_init(nn.initializers.lecun_normal(), 1e-3))(x)


def count_params(params) -> int:
  """Number of scalars in a params pytree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
