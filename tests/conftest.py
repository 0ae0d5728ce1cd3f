"""Shared test helpers: a tiny CNN that is NOT an mgtrain model, and data."""

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


class TinyCNN(nn.Module):
  """A plain Flax CNN defined outside mgtrain (checks the API is model-agnostic)."""

  features: int = 4

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.features, (3, 3), padding="SAME")(x)
    h = nn.tanh(h)
    return nn.Conv(x.shape[-1], (3, 3), padding="SAME")(h)


def smooth_images(key, n, size, channels=1):
  """Smooth random images: a few low-frequency sinusoids per sample."""
  k1, k2 = jax.random.split(key)
  coef = jax.random.normal(k1, (n, 3, 3, channels))
  phase = jax.random.uniform(k2, (n, 3, 3, channels)) * 2 * jnp.pi
  x = (jnp.arange(size) + 0.5) / size
  out = 0.0
  for a in range(3):
    for b in range(3):
      wave = jnp.cos(2 * jnp.pi * (a * x[:, None] + b * x[None, :])[None, :, :, None]
                     + phase[:, None, None, a, b, :])
      out = out + coef[:, None, None, a, b, :] * wave
  return out


@pytest.fixture
def tiny_model():
  model = TinyCNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  return model, params


def mse_loss_fn(model):
  def loss_fn(params, batch):
    pred = model.apply(params, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2, axis=(1, 2, 3))
  return loss_fn
