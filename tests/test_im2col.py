"""The patch matrix product (im2col) against XLA's direct 3x3 convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conv_reference import direct, relative_error
from mgtrain.nn.im2col import im2col_conv3x3


def test_patch_matrix_is_the_correlation_in_numpy():
  # An independent loop over output pixels and taps, in float64.
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(2, 3, 2, 4)), rng.normal(size=(3, 3, 4, 5))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = np.zeros((2, 3, 2, 5))
  for y in range(3):
    for z in range(2):
      expected[:, y, z] = np.einsum("bhwi,hwio->bo", xp[:, y:y + 3, z:z + 3], w)
  with jax.enable_x64(True):
    np.testing.assert_allclose(im2col_conv3x3(jnp.asarray(x), jnp.asarray(w)), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 1, 1, 4), (5, 2, 2, 3), (2, 1, 2, 6), (2, 2, 1, 6),
                                   (1, 5, 7, 3), (2, 8, 8, 5)])
def test_value_and_gradients_match_the_direct_conv(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], 7))
  target = jax.random.normal(jax.random.key(2), shape[:3] + (7,))
  assert relative_error(im2col_conv3x3(x, w), direct(x, w, precision="highest")) < 1e-5

  def loss(conv):
    return lambda x, w: jnp.sum((conv(x, w) - target) ** 2)

  # Jitted: eagerly, every op of the two backward passes compiled on its own.
  ours = jax.jit(jax.grad(loss(im2col_conv3x3), argnums=(0, 1)))(x, w)
  ref = jax.jit(jax.grad(loss(lambda x, w: direct(x, w, precision="highest")),
                         argnums=(0, 1)))(x, w)
  for a, b in zip(ours, ref):
    assert relative_error(a, b) < 1e-5


def test_other_dtypes_are_kept():
  x = jnp.ones((2, 2, 2, 3), jnp.bfloat16)
  w = jnp.ones((3, 3, 3, 4), jnp.bfloat16)
  y = im2col_conv3x3(x, w)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32), 12.0)   # 4 pixels x 3 channels


@pytest.mark.parametrize("x_shape, w_shape, dtype, match", [
    ((2, 2, 2), (3, 3, 2, 2), jnp.float32, "NHWC"),
    ((1, 2, 2, 2), (5, 5, 2, 2), jnp.float32, "NHWC"),
    ((1, 2, 2, 2), (3, 3, 4, 2), jnp.float32, "input channels"),
])
def test_bad_operands_are_errors(x_shape, w_shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    im2col_conv3x3(jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype))


def test_mixed_dtypes_are_errors():
  with pytest.raises(ValueError, match="one dtype"):
    im2col_conv3x3(jnp.zeros((1, 2, 2, 2)), jnp.zeros((3, 3, 2, 2), jnp.bfloat16))
