"""The conv factory: every spatial convolution of an mgtrain model comes from here.

Models take a ``conv`` argument, a callable ``conv(features, kernel_size,
name=...) -> flax.linen.Module`` that maps ``(B, H, W, C_in)`` to
``(B, H, W, features)``. Swapping the factory swaps every spatial conv of a
model at once (e.g. standard kxk convolutions vs. mesh-free convolutions), so
MFC-ResNet is the same model code as ResNet.

Example:
  >>> import jax, jax.numpy as jnp
  >>> layer = standard_conv(8, 3)
  >>> params = layer.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  >>> layer.apply(params, jnp.zeros((2, 16, 16, 3))).shape
  (2, 16, 16, 8)
"""

from __future__ import annotations

import functools
from typing import Callable, Protocol

import flax.linen as nn
import jax

from mgtrain.nn.conv_dispatch import Conv3x3Dispatch


class ConvFactory(Protocol):

  def __call__(self, features: int, kernel_size: int, *,
               name: str | None = None, **kwargs) -> nn.Module:
    ...


class BoundConv(functools.partial):
  """A conv factory with options bound, whose ``repr`` names them and no address.

  Models print their ``conv`` field in their ``repr``, which is what
  :class:`mgtrain.step_cache.StepCache` keys on; ``functools.partial``'s own
  ``repr`` would put the factory's memory address there, different in every
  process.
  """

  def __repr__(self):
    options = ", ".join(f"{k}={v!r}" for k, v in sorted(self.keywords.items()))
    return f"{self.func.__module__}.{self.func.__qualname__}({options})"


CONV_ALGORITHMS = ("auto", "direct", "winograd")


def resolve_conv_algorithm(algorithm: str) -> str:
  """``'direct'`` or ``'winograd'`` for ``algorithm`` (``'auto'``: Winograd on CPU).

  ``'auto'`` looks at JAX's default backend when the model is traced: on CPU
  the Winograd form's fwd+bwd is about 2x faster than XLA's direct
  convolution for wide layers (:mod:`mgtrain.nn.winograd`), and a patch
  matrix product 3-14x faster on meshes of 2 x 2 pixels or fewer
  (:mod:`mgtrain.nn.im2col`); GPU libraries choose their own algorithms, so
  elsewhere it is ``'direct'``.
  """
  if algorithm not in CONV_ALGORITHMS:
    raise ValueError(f"unknown conv algorithm {algorithm!r}; choose from {CONV_ALGORITHMS}")
  if algorithm == "auto":
    return "winograd" if jax.default_backend() == "cpu" else "direct"
  return algorithm


def dispatched_conv_kwargs(algorithm: str = "auto") -> dict:
  """``flax.linen.Conv`` keyword arguments for a conv made outside the factory.

  A model's 1x1 maps and strided convs are ``nn.Conv`` layers of their own.
  Where ``algorithm`` resolves to ``'winograd'`` (``'auto'``: on CPU) they
  go through :class:`mgtrain.nn.conv_dispatch.Conv3x3Dispatch` too, which
  computes them directly with kernel and input gradients that stay fast
  inside a loop body (:mod:`mgtrain.nn.direct_conv`); elsewhere they are Flax's
  default. The parameters are the same either way.

  >>> sorted(dispatched_conv_kwargs("winograd")), dispatched_conv_kwargs("direct")
  (['conv_general_dilated'], {})
  """
  if resolve_conv_algorithm(algorithm) == "winograd":
    return {"conv_general_dilated": Conv3x3Dispatch()}
  return {}


def standard_conv(features: int, kernel_size: int, *, name: str | None = None,
                  algorithm: str = "auto", **kwargs) -> nn.Module:
  """A ``kernel_size x kernel_size`` convolution, stride 1, 'SAME' padding, bias.

  This is PyTorch's ``nn.Conv2d(c_in, features, k, padding=k // 2)`` for odd
  ``k``, the layer the reference code uses. ``algorithm`` (see
  :func:`resolve_conv_algorithm`): ``'winograd'`` lets
  :class:`mgtrain.nn.conv_dispatch.Conv3x3Dispatch` pick, per call, with
  the same parameters: on meshes of at most 2 x 2 a patch matrix product
  (:mod:`mgtrain.nn.im2col`); float32 convolutions as F(4x4, 3x3)
  (:mod:`mgtrain.nn.winograd`) when the layer is wide and big enough (at
  least 32 input and output channels and 4,096 batch x pixels, from 96
  channels 1,024 pixels, from 192 channels 2,048); other layers, kernel
  sizes, strides and dtypes stay direct.
  """
  kwargs.update(dispatched_conv_kwargs(algorithm))
  return nn.Conv(features, (kernel_size, kernel_size), padding="SAME",
                 name=name, **kwargs)


def _mesh_free(features: int, kernel_size: int | None = None, *, name: str | None = None,
               **kwargs) -> nn.Module:
  from mgtrain.nn.meshfree import mesh_free_conv
  return mesh_free_conv(features, kernel_size, name=name, **kwargs)


_mesh_free_pairwise = BoundConv(_mesh_free, pairwise=True)


def _spectral(features: int, kernel_size: int | None = None, *, name: str | None = None,
              **kwargs) -> nn.Module:
  from mgtrain.nn.spectral import spectral_conv
  return spectral_conv(features, kernel_size, name=name, **kwargs)


CONV_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "standard": standard_conv,
    # 1x1 map then one heat-equation filter per channel (7 params per channel).
    "mfc": _mesh_free,
    # 7 symbol params per (input, output) channel pair: the paper's
    # parameter counts (MFC-ResNet 532,163).
    "mfc-pairwise": _mesh_free_pairwise,
    # FNO truncated-mode spectral conv with its 1x1 bypass.
    "spectral": _spectral,
}


def with_dtype(conv: Callable[..., nn.Module], dtype) -> Callable[..., nn.Module]:
  """The factory ``conv`` with its modules' compute dtype bound (``None``: ``conv`` itself).

  Every factory here passes ``dtype`` on to its module (Flax's compute
  dtype; the parameters keep theirs), so a model made for bfloat16 compute
  changes no factory.
  """
  return BoundConv(conv, dtype=dtype) if dtype is not None else conv


def get_conv(name: str, **options) -> Callable[..., nn.Module]:
  """Looks up a conv factory by name; ``options`` are bound as keyword arguments.

  Names: ``'standard'`` (kxk), ``'mfc'`` (mesh-free, per channel),
  ``'mfc-pairwise'`` (mesh-free, per channel pair) and ``'spectral'`` (FNO).
  For example ``get_conv('mfc', length_scale=1/32)``.
  """
  try:
    factory = CONV_FACTORIES[name]
  except KeyError:
    raise ValueError(
        f"unknown conv {name!r}; available: {sorted(CONV_FACTORIES)}") from None
  if not options:
    return factory
  return BoundConv(factory, **options)
