"""FNO spectral convolution: truncation, mesh consistency, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mgtrain.nn.spectral import SpectralConv, spectral_mix


def _modes_image(n, modes):
  yy, xx = np.meshgrid(np.arange(n) / n, np.arange(n) / n, indexing="ij")
  return sum(np.cos(2 * np.pi * (mx * xx + my * yy)) for mx, my in modes)


def _identity_weights(modes, channels):
  eye = jnp.eye(channels, dtype=jnp.complex64)
  return jnp.broadcast_to(eye, (2, modes, modes, channels, channels))


def test_identity_weights_keep_low_modes_and_drop_high_ones():
  n, modes = 32, 4
  low = _modes_image(n, [(1, 0), (2, -3), (0, 3)])
  high = _modes_image(n, [(6, 1), (1, 9)])
  u = jnp.asarray(np.stack([low, low + high], -1)[None], jnp.float32)
  out = np.asarray(spectral_mix(u, _identity_weights(modes, 2)))[0]
  np.testing.assert_allclose(out[..., 0], low, atol=1e-5)
  np.testing.assert_allclose(out[..., 1], low, atol=1e-5)   # high modes removed


def test_same_params_same_operator_on_finer_meshes():
  layer = SpectralConv(3, modes=5)
  params = layer.init(jax.random.key(0), jnp.zeros((1, 16, 16, 2)))
  apply = jax.jit(layer.apply)
  samples = []
  for n in (16, 32, 64):
    u = np.stack([_modes_image(n, [(1, 2)]), _modes_image(n, [(3, -1)])], -1)
    out = np.asarray(apply(params, jnp.asarray(u[None], jnp.float32)))[0]
    samples.append(out[:: n // 8, :: n // 8])
  for s in samples[1:]:
    np.testing.assert_allclose(s, samples[0], atol=1e-5)


def test_mesh_coarser_than_the_modes_uses_the_modes_it_has():
  layer = SpectralConv(2, modes=12, bypass=False)
  params = layer.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  out = layer.apply(params, jnp.ones((2, 4, 4, 1)))
  assert out.shape == (2, 4, 4, 2) and np.isfinite(np.asarray(out)).all()


def test_gradients_match_finite_differences():
  layer = SpectralConv(2, modes=3)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
  params = layer.init(jax.random.key(2), x)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    x64 = x.astype(jnp.float64)
    loss = jax.jit(lambda p: jnp.sum(jnp.sin(layer.apply(p, x64))))
    check_grads(loss, (p64,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_invalid_inputs_raise():
  with pytest.raises(ValueError, match="NHWC"):
    SpectralConv(2).init(jax.random.key(0), jnp.zeros((8, 8, 1)))
  with pytest.raises(ValueError, match="modes"):
    SpectralConv(2, modes=0).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
