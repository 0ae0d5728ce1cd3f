"""The reference denoising UNet of the MGE paper (2,537,187 parameters).

A diffusion-style UNet (the ``UNetModel`` of openai/improved-diffusion), with
the sizes of the authors' code (DESIGN.md section 2; MGE paper Table 7, MFC
paper Table 13): base 32 channels, channel multipliers ``(1, 2, 4)``, one
residual block per level, dropout 0.5, GroupNorm with 16 groups + SiLU, and a
single-head self-attention block in the middle only.

Layout, for an ``(B, H, W, 3)`` input (``H, W`` divisible by 4)::

  t -> sinusoidal(32) -> Dense(32 -> 128) -> SiLU -> Dense(128 -> 128) = emb
  conv3x3(3 -> 32)                                          H      [skip 32]
  ResBlock(32 -> 32)                                        H      [skip 32]
  Downsample: stride-2 conv3x3(32 -> 32)                    H/2    [skip 32]
  ResBlock(32 -> 64)                                        H/2    [skip 64]
  Downsample: stride-2 conv3x3(64 -> 64)                    H/4    [skip 64]
  ResBlock(64 -> 128)                                       H/4    [skip 128]
  middle: ResBlock(128), Attention(128), ResBlock(128)      H/4
  ResBlock(128 + 128 -> 128), ResBlock(128 + 64 -> 128),
    Upsample: nearest x2 + conv3x3(128 -> 128)              H/4 -> H/2
  ResBlock(128 + 64 -> 64), ResBlock(64 + 32 -> 64),
    Upsample: nearest x2 + conv3x3(64 -> 64)                H/2 -> H
  ResBlock(64 + 32 -> 32), ResBlock(32 + 32 -> 32)          H
  GroupNorm -> SiLU -> conv3x3(32 -> 3), zero-initialised   H

``ResBlock(c_in -> c)``: ``h = conv3x3(SiLU(GN(x)))``, ``h += Dense(SiLU(emb))``
broadcast over the mesh, ``h = conv3x3(Dropout(SiLU(GN(h))))`` (zero-init),
output ``skip(x) + h`` with ``skip`` a 1x1 conv when ``c_in != c``. The
attention block is ``x + proj(attn(qkv(GN(x))))`` over the ``H/4 * W/4``
tokens with ``qkv`` a 1x1 map ``C -> 3C`` and ``proj`` a zero-initialised 1x1
map. ``sinusoidal(32)`` is ``[cos, sin]`` of ``1000 t`` at 16 frequencies
(:func:`mgtrain.nn.embeddings.sinusoidal_embedding`; improved-diffusion's
``timestep_embedding`` of the diffusion step). The network predicts the
clean image and outputs exactly zero at init.

Which layers the ``conv`` factory makes (so MFC-UNet is this code with
``conv=get_conv('mfc-pairwise')``): every stride-1 3x3 conv, i.e. the input
conv, both convs of every ResBlock, the conv after each nearest upsampling
and the output conv. The other layers are the same in both variants:

* the stride-2 downsampling convs stay standard 3x3 convs: a mesh-free conv
  has no stencil to stride, and the count below matches the reference only
  with a learned stride-2 conv there (not pooling);
* the 1x1 maps (ResBlock skips, attention ``qkv`` / ``proj``) stay dense
  channel maps: they are pointwise, hence mesh-free already (the MFC-ResNet
  keeps its 1x1 lift / projection too, which is what gives its 532,163).

With the standard factory this has exactly 2,537,187 parameters. With
``get_conv('mfc-pairwise')`` it has 2,371,276, not the 2,307,411 of the MFC
paper's Table 13. We searched every subset of conv kinds to swap (input,
ResBlock convs, skips, down/upsampling, attention maps, output) against the
mesh-free parametrisations that give MFC-ResNet's 532,163 (``d^2 + d + 7dc``
as here, ``8dc + c``, ``dc + c + 7c^2``, with and without biases) and also
dropping the resampling convs or the attention: none gives 2,307,411 (the
closest are 49 off, with arbitrary subsets), so the authors' MFC-UNet
differs in a way the papers do not describe.

Zero initialisation (improved-diffusion's ``zero_module``): the last conv of
every ResBlock, the attention projection and the output conv start with all
parameters zero, except a mesh-free conv's ``symbol``. A mesh-free conv is the
product ``S * (R u)`` of its symbol and its channel map; zeroing both factors
would make the gradient of each vanish and the layer could never leave zero,
so only ``R`` (and its bias) are zeroed, which already makes the layer output
zero.

Example:
  Shapes only, with ``jax.eval_shape`` (it compiles nothing); ``model.init``
  and ``model.apply`` take the same arguments.

  >>> import jax, jax.numpy as jnp
  >>> model = UNet()
  >>> u, t = jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,))
  >>> params = jax.eval_shape(model.init, jax.random.key(0), u, t)
  >>> count_params(params)
  2537187
  >>> jax.eval_shape(model.apply, params, u, t).shape      # eval: no dropout
  (2, 16, 16, 3)
  >>> y = jax.eval_shape(lambda p, x: model.apply(
  ...     p, x, t, train=True, rngs={"dropout": jax.random.key(1)}), params, u)
  >>> y.shape                                               # train: dropout 0.5
  (2, 16, 16, 3)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mgtrain.nn.convs import dispatched_conv_kwargs, standard_conv, with_dtype
from mgtrain.nn.embeddings import sinusoidal_embedding
from mgtrain.nn.resnet import count_params

__all__ = ["UNet", "ResBlock", "AttentionBlock", "count_params"]


def _zero_params(variables):
  """Zeroes every parameter except mesh-free symbols (see the module docstring)."""
  def zero(path, leaf):
    keys = {getattr(k, "key", None) for k in path}
    return leaf if "symbol" in keys else jnp.zeros_like(leaf)
  return jax.tree_util.tree_map_with_path(zero, variables)


class _FactoryConv(nn.Module):
  """``conv(features, kernel_size)`` from a factory, as a module of its own."""

  conv: Callable[..., nn.Module]
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, x):
    return self.conv(self.features, self.kernel_size, name="layer")(x)


def _zero_init_conv(parent: nn.Module, conv: Callable[..., nn.Module], features: int,
                    kernel_size: int, name: str) -> nn.Module:
  """A factory conv whose parameters are zeroed when ``parent`` is initialised.

  Must be called inside ``parent``'s compact method. The parameters live under
  ``name/layer``.
  """
  initializing = parent.is_initializing()
  cls = nn.map_variables(_FactoryConv, "params", trans_out_fn=_zero_params,
                         init=initializing, mutable=initializing)
  return cls(conv, features, kernel_size, name=name)


def _group_norm(groups: int, name: str, dtype=None) -> nn.GroupNorm:
  # PyTorch's nn.GroupNorm (the reference GroupNorm32) uses eps = 1e-5. Flax
  # takes its statistics in float32 whatever ``dtype`` is.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, name=name)


class ResBlock(nn.Module):
  """Time-conditioned residual block ``(B, H, W, C_in) -> (B, H, W, features)``.

  Attributes:
    features: output channels.
    dropout: dropout rate before the second conv.
    groups: GroupNorm groups.
    conv: conv factory for the two 3x3 convs.
    dtype: compute dtype (``None``: float32; see :class:`UNet`).
  """

  features: int
  dropout: float = 0.5
  groups: int = 16
  conv: Callable[..., nn.Module] = standard_conv
  dtype: Any = None

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    conv = with_dtype(self.conv, self.dtype)
    h = nn.silu(_group_norm(self.groups, "norm_0", self.dtype)(x))
    h = conv(self.features, 3, name="conv_0")(h)
    h = h + nn.Dense(self.features, dtype=self.dtype, name="emb")(nn.silu(emb))[:, None, None, :]
    h = nn.silu(_group_norm(self.groups, "norm_1", self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _zero_init_conv(self, conv, self.features, 3, "conv_1")(h)
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, dtype=self.dtype, name="skip")(x)   # 1x1 conv
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over all pixels, residual, ``(B, H, W, C)``.

  ``qkv`` is a 1x1 map ``C -> 3C`` split as ``[q, k, v]`` (improved-diffusion's
  order for one head), scores ``q . k / sqrt(C)`` softmaxed in float32, and the
  1x1 output projection is zero-initialised.
  """

  groups: int = 16
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    h = _group_norm(self.groups, "norm", self.dtype)(x).reshape(b, height * width, c)
    q, k, v = jnp.split(nn.Dense(3 * c, dtype=self.dtype, name="qkv")(h), 3, axis=-1)
    scores = jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(h.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v)
    h = nn.Dense(c, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="proj_out")(h)
    return x + h.reshape(b, height, width, c)


class UNet(nn.Module):
  """Time-conditioned UNet denoiser; ``apply(params, u, t, train=...) -> y_hat``.

  Attributes:
    base_channels: channels at full resolution (32).
    channel_mult: channel multiplier per level (``(1, 2, 4)``); there are
      ``len(channel_mult) - 1`` downsamplings, so ``H`` and ``W`` must be
      divisible by ``2 ** (len(channel_mult) - 1)``.
    num_res_blocks: ResBlocks per level on the way down (``+ 1`` on the way up).
    dropout: dropout rate in every ResBlock (0.5), active only when
      ``train=True``.
    groups: GroupNorm groups (16).
    emb_features: width of the time-embedding MLP (``4 * base_channels``).
    attention: whether the middle block has the self-attention layer.
    in_channels: channels of the input image (3).
    out_channels: channels of the output image (3).
    conv: conv factory for every stride-1 3x3 conv (see the module docstring
      and :mod:`mgtrain.nn.convs`).
    dtype: compute dtype (``None``: float32). ``jnp.bfloat16`` runs every
      conv, dense map, attention product and activation in bfloat16; the
      parameters stay float32 (the same tree), GroupNorm statistics, the
      softmax and the sinusoidal features are float32.
  """

  base_channels: int = 32
  channel_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 1
  dropout: float = 0.5
  groups: int = 16
  emb_features: int = 128
  attention: bool = True
  in_channels: int = 3
  out_channels: int = 3
  conv: Callable[..., nn.Module] = standard_conv
  dtype: Any = None

  @nn.compact
  def __call__(self, u, t, *, train: bool = False):
    """Predicts the clean image.

    Args:
      u: ``(B, H, W, in_channels)`` noisy images, NHWC, ``H`` and ``W``
        divisible by ``2 ** (len(channel_mult) - 1)`` (4 by default).
      t: ``(B,)`` noise levels in ``[0, 1]`` (a scalar is broadcast).
      train: enables dropout; then ``apply`` needs a ``'dropout'`` rng.

    Returns:
      ``(B, H, W, out_channels)``.
    """
    self._check_input(u)
    batch = u.shape[0]
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
      raise ValueError(f"t must have shape ({batch},) to match u, got {t.shape}")

    emb = sinusoidal_embedding(t, self.base_channels // 2)
    emb = nn.Dense(self.emb_features, dtype=self.dtype, name="time_0")(emb)
    emb = nn.Dense(self.emb_features, dtype=self.dtype, name="time_1")(nn.silu(emb))
    conv = with_dtype(self.conv, self.dtype)

    def res_block(h, features, name):
      return ResBlock(features, self.dropout, self.groups, self.conv, self.dtype, name=name)(
          h, emb, train)

    h = conv(self.base_channels, 3, name="input")(u)
    skips = [h]
    levels = len(self.channel_mult)
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res_block(h, mult * self.base_channels, f"down_{level}_{i}")
        skips.append(h)
      if level != levels - 1:
        # Stride-2 3x3 conv with PyTorch's padding 1 (not the factory).
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                    dtype=self.dtype, name=f"downsample_{level}", **dispatched_conv_kwargs())(h)
        skips.append(h)

    c = h.shape[-1]
    h = res_block(h, c, "middle_0")
    if self.attention:
      h = AttentionBlock(self.groups, self.dtype, name="middle_attention")(h)
    h = res_block(h, c, "middle_1")

    for level in reversed(range(levels)):
      features = self.channel_mult[level] * self.base_channels
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(h, features, f"up_{level}_{i}")
      if level:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)   # nearest x2
        h = conv(features, 3, name=f"upsample_{level}")(h)

    h = nn.silu(_group_norm(self.groups, "out_norm", self.dtype)(h))
    return _zero_init_conv(self, conv, self.out_channels, 3, "output")(h)

  @property
  def mesh_multiple(self) -> int:
    """What every image side must be divisible by: ``2 ** (len(channel_mult) - 1)``.

    A multiscale run feeds the model every mesh of its hierarchy, so the
    coarsest one must be a multiple too (e.g. 16^2 for 4 levels at 128^2).
    """
    return 2 ** (len(self.channel_mult) - 1)

  def _check_input(self, u) -> None:
    if u.ndim != 4 or u.shape[-1] != self.in_channels:
      raise ValueError(f"expected NHWC images with {self.in_channels} channels "
                       f"(B, H, W, {self.in_channels}), got shape {u.shape}")
    factor = self.mesh_multiple
    if u.shape[1] % factor or u.shape[2] % factor:
      raise ValueError(f"image sides must be divisible by {factor} "
                       f"({len(self.channel_mult) - 1} downsamplings), got "
                       f"{u.shape[1]}x{u.shape[2]}")
