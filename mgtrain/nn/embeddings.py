"""Time embeddings for time-conditioned denoisers (u = t y + (1 - t) z)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp


def sinusoidal_embedding(t: jnp.ndarray, frequencies: int,
                         max_period: float = 10_000.0,
                         time_scale: float = 1_000.0) -> jnp.ndarray:
  """Transformer-style sinusoidal features of a scalar per sample.

  ``emb = [cos(s t w_k), sin(s t w_k)]_k`` with ``w_k = max_period^(-k /
  frequencies)``, ``k = 0..frequencies-1`` and ``s = time_scale`` (t in [0, 1]
  is mapped to the diffusion-style range [0, 1000]).

  Args:
    t: ``(B,)`` noise levels.
    frequencies: number of frequencies; the result has ``2 * frequencies``
      features.

  Returns:
    ``(B, 2 * frequencies)``.
  """
  t = jnp.asarray(t, jnp.float32).reshape(-1)
  k = jnp.arange(frequencies, dtype=jnp.float32)
  w = jnp.exp(-math.log(max_period) * k / frequencies)
  arg = time_scale * t[:, None] * w[None, :]
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


class TimeEmbedding(nn.Module):
  """Sinusoidal features of t concatenated with an MLP of t.

  ``[sinusoidal(t, frequencies) ++ MLP(t)]`` with the MLP
  ``1 -> hidden -> hidden -> mlp_out`` and SiLU between layers. With the
  reference ResNet's sizes (32 frequencies, hidden 32, mlp_out 64) the
  embedding has 128 features and 3,232 parameters.
  """

  frequencies: int = 32
  hidden: int = 32
  mlp_out: int = 64

  @nn.compact
  def __call__(self, t):
    t = jnp.asarray(t, jnp.float32).reshape(-1, 1)
    h = nn.silu(nn.Dense(self.hidden, name="mlp_0")(t))
    h = nn.silu(nn.Dense(self.hidden, name="mlp_1")(h))
    h = nn.Dense(self.mlp_out, name="mlp_2")(h)
    return jnp.concatenate([sinusoidal_embedding(t[:, 0], self.frequencies), h], -1)
