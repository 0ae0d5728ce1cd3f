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

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgtrain.nn.convs import standard_conv
from mgtrain.nn.embeddings import TimeEmbedding


def layer_norm_chw(x: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
  """Layer norm over (H, W, C) per sample, no affine (``F.layer_norm(x, x.shape[1:])``)."""
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _scaled_init(base, scale: float):
  def init(key, shape, dtype=jnp.float32):
    return scale * base(key, shape, dtype)
  return init


class ResBlock(nn.Module):
  features: int
  conv: Callable[..., nn.Module] = standard_conv

  @nn.compact
  def __call__(self, x, t):
    h = self.conv(self.features, 3, name="conv_0")(x)
    h = h + TimeEmbedding(name="time")(t)[:, None, None, :h.shape[-1]]
    h = nn.leaky_relu(layer_norm_chw(h), 0.2)
    return x + self.conv(self.features, 3, name="conv_1")(h)


class ResNet(nn.Module):
  """Time-conditioned residual denoiser; ``apply(params, u, t) -> y_hat``.

  Attributes:
    features: hidden channels (128 in the reference).
    blocks: number of residual blocks (2).
    out_channels: output channels (3).
    conv: conv factory for every spatial conv (see :mod:`mgtrain.nn.convs`).
  """

  features: int = 128
  blocks: int = 2
  out_channels: int = 3
  conv: Callable[..., nn.Module] = standard_conv

  @nn.compact
  def __call__(self, u, t):
    if u.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {u.shape}")
    if self.features != 128:
      # The time embedding has 2*32 + 64 = 128 features by construction.
      raise ValueError("the reference time embedding has 128 features; "
                       f"features={self.features} is not supported")
    x = nn.Conv(self.features, (1, 1), name="lift")(u)
    for i in range(self.blocks):
      x = ResBlock(self.features, self.conv, name=f"block_{i}")(x, t)
    return nn.Conv(
        self.out_channels, (1, 1), name="project",
        kernel_init=_scaled_init(nn.initializers.lecun_normal(), 1e-3))(x)


def count_params(params) -> int:
  """Number of scalars in a params pytree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
