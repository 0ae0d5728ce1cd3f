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


class ConvFactory(Protocol):

  def __call__(self, features: int, kernel_size: int, *,
               name: str | None = None, **kwargs) -> nn.Module:
    ...


def standard_conv(features: int, kernel_size: int, *, name: str | None = None,
                  **kwargs) -> nn.Module:
  """A ``kernel_size x kernel_size`` convolution, stride 1, 'SAME' padding, bias.

  This is PyTorch's ``nn.Conv2d(c_in, features, k, padding=k // 2)`` for odd
  ``k``, the layer the reference code uses.
  """
  return nn.Conv(features, (kernel_size, kernel_size), padding="SAME",
                 name=name, **kwargs)


def _mesh_free(features: int, kernel_size: int | None = None, *, name: str | None = None,
               **kwargs) -> nn.Module:
  from mgtrain.nn.meshfree import mesh_free_conv
  return mesh_free_conv(features, kernel_size, name=name, **kwargs)


_mesh_free_pairwise = functools.partial(_mesh_free, pairwise=True)


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
  return functools.partial(conv, dtype=dtype) if dtype is not None else conv


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
  return functools.partial(factory, **options)
