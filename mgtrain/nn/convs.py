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


CONV_FACTORIES: dict[str, Callable[..., nn.Module]] = {"standard": standard_conv}


def get_conv(name: str) -> Callable[..., nn.Module]:
  """Looks up a conv factory by name (``'standard'``)."""
  try:
    return CONV_FACTORIES[name]
  except KeyError:
    raise ValueError(
        f"unknown conv {name!r}; available: {sorted(CONV_FACTORIES)}") from None
