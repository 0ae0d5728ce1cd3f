import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgtrain.nn import init_params
from mgtrain.nn.embeddings import TimeEmbedding, sinusoidal_embedding
from mgtrain.nn.resnet import ResNet, count_params, layer_norm_chw


def test_reference_parameter_count():
  model = ResNet()
  params = init_params(model, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))
  assert count_params(params) == 597_699  # DESIGN.md / MGE paper Table 7
  emb = TimeEmbedding().init(jax.random.key(0), jnp.zeros((1,)))
  assert count_params(emb) == 3_232


def test_any_mesh_and_small_initial_output():
  model = ResNet()
  params = init_params(model, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))
  apply = jax.jit(model.apply)
  for size in (8, 16, 32):
    u = jax.random.normal(jax.random.key(size), (2, size, size, 3))
    out = apply(params, u, jnp.array([0.2, 0.9]))
    assert out.shape == u.shape
    # The projection is initialised x1e-3, so an untrained net outputs ~0.
    assert float(jnp.abs(out).max()) < 0.05


def test_time_conditioning_matters():
  model = ResNet()
  params = init_params(model, jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))
  u = jax.random.normal(jax.random.key(1), (1, 8, 8, 3))
  a = model.apply(params, u, jnp.array([0.1]))
  b = model.apply(params, u, jnp.array([0.9]))
  assert float(jnp.abs(a - b).max()) > 0


def test_layer_norm_over_chw():
  x = jax.random.normal(jax.random.key(0), (3, 4, 5, 6)) * 3 + 2
  y = layer_norm_chw(x)
  np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), 0, atol=1e-5)
  np.testing.assert_allclose(y.var(axis=(1, 2, 3)), 1, rtol=1e-3)


def test_sinusoidal_embedding():
  e = sinusoidal_embedding(jnp.array([0.0, 0.5]), 32)
  assert e.shape == (2, 64)
  np.testing.assert_allclose(e[0, :32], 1.0)
  np.testing.assert_allclose(e[0, 32:], 0.0)


def test_rejects_non_image_input():
  model = ResNet()
  with pytest.raises(ValueError, match="NHWC"):
    model.init(jax.random.key(0), jnp.zeros((8, 8, 3)), jnp.zeros((1,)))
