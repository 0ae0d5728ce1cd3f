"""Winograd F(4x4, 3x3) convolutions against XLA's direct convolution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conv_reference import direct, primitives, relative_error
from mgtrain.nn import winograd
from mgtrain.nn.convs import CONV_ALGORITHMS, get_conv, resolve_conv_algorithm, standard_conv
from mgtrain.nn.resnet import ResNet


def test_f43_matrices_compute_a_correlation_in_exact_arithmetic():
  # Lavin & Gray: y = A^T [(G g) * (B^T d)] is the 4-output correlation of a
  # 6-input tile d with a 3-tap g. Checked in float64, independently of JAX.
  rng = np.random.default_rng(0)
  for _ in range(5):
    d, g = rng.normal(size=6), rng.normal(size=3)
    y = winograd.A_T @ ((winograd.G @ g) * (winograd.B_T @ d))
    expected = np.array([d[i:i + 3] @ g for i in range(4)])
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 8, 8, 5), (1, 5, 7, 3), (3, 1, 1, 4), (1, 12, 9, 6),
                                   (2, 4, 16, 2)])
def test_matches_the_direct_convolution_on_any_mesh(shape):
  kx, kw = jax.random.split(jax.random.key(shape[1] * 31 + shape[2]))
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, (3, 3, shape[-1], 7))
  # Jitted, as the models call it; the float64 test below runs it eagerly.
  y = jax.jit(winograd.winograd_conv3x3)(x, w)
  assert y.shape == shape[:3] + (7,)
  assert relative_error(y, direct(x, w, precision="highest")) < 5e-5


@pytest.mark.parametrize("shape", [(2, 12, 8, 16), (1, 5, 7, 3), (2, 9, 14, 4)])
def test_gradients_match_the_direct_convolution(shape):
  # Meshes off the 4-pixel tile grid exercise the pad/crop of the written-out
  # adjoints, and tiles overlapping at their edges their sums.
  kx, kw, kg = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, (3, 3, shape[-1], 8)) / 12
  target = jax.random.normal(kg, shape[:3] + (8,))

  def loss(conv):
    return lambda x, w: jnp.sum((conv(x, w) - target) ** 2)

  got = jax.jit(jax.grad(loss(winograd.winograd_conv3x3), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(direct), argnums=(0, 1)))(x, w)
  for g, r in zip(got, want):
    assert relative_error(g, r) < 5e-5


def test_float64_is_exact_to_double_rounding():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (1, 9, 10, 3), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 2), jnp.float64)
    y = winograd.winograd_conv3x3(x, w)
    assert y.dtype == jnp.float64
    assert relative_error(y, direct(x, w)) < 1e-13


@pytest.mark.parametrize("x_shape, w_shape, dtype, match", [
    ((2, 8, 8), (3, 3, 2, 2), jnp.float32, "NHWC"),
    ((1, 8, 8, 2), (5, 5, 2, 2), jnp.float32, "NHWC"),
    ((1, 8, 8, 2), (3, 3, 4, 2), jnp.float32, "input channels"),
    ((1, 8, 8, 2), (3, 3, 2, 2), jnp.bfloat16, "float32 or float64"),
])
def test_bad_operands_are_errors(x_shape, w_shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    winograd.winograd_conv3x3(jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype))


def test_conv_algorithm_names():
  assert set(CONV_ALGORITHMS) == {"auto", "direct", "winograd"}
  assert resolve_conv_algorithm("auto") == (
      "winograd" if jax.default_backend() == "cpu" else "direct")
  assert resolve_conv_algorithm("direct") == "direct"
  with pytest.raises(ValueError, match="unknown conv algorithm"):
    resolve_conv_algorithm("fft")
  with pytest.raises(ValueError, match="unknown conv algorithm"):
    standard_conv(8, 3, algorithm="fft")


# The ResNet only: a UNet took 49 s here (CI's budget), and what it adds
# (strided and 1x1 convs staying direct) is the dispatch test's.
@pytest.mark.parametrize("model_cls, options", [(ResNet, {})])
def test_models_have_the_same_parameters_and_outputs_either_way(model_cls, options):
  # Same parameters from the same key; outputs and gradients within float32
  # rounding of F(4x4, 3x3) (with Lavin & Gray's points, this ResNet's first
  # kernel gradient was off by 1.2e-3: see mgtrain.nn.winograd).
  u = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))   # 4,096 pixels: Winograd's minimum
  t = jnp.full((4,), 0.3)
  models = {a: model_cls(conv=get_conv("standard", algorithm=a), **options)
            for a in ("direct", "winograd")}
  params = {a: jax.jit(m.init)(jax.random.key(1), u[:1], t[:1]) for a, m in models.items()}
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                   params["direct"], params["winograd"]))
  # Non-trivial weights everywhere (some layers start at zero).
  p = jax.jit(lambda params: jax.tree.map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), params))(
          params["direct"])

  @functools.partial(jax.jit, static_argnums=1)
  def output_and_gradient(p, algorithm):
    # One program per algorithm: the output and the gradient of mean(y^2).
    y, vjp = jax.vjp(lambda p: models[algorithm].apply(p, u, t), p)
    return y, vjp(2 * y / y.size)[0]

  out = {a: output_and_gradient(p, a) for a in models}
  assert "conv_general_dilated" in primitives(lambda p: models["direct"].apply(p, u, t), p)
  assert relative_error(out["winograd"][0], out["direct"][0]) < 1e-4
  leaves = zip(jax.tree.leaves(out["winograd"][1]), jax.tree.leaves(out["direct"][1]))
  assert max(relative_error(a, b) for a, b in leaves) < 1e-4


def test_lax_slicing_helpers_equal_numpy_indexing():
  """``_strided`` and ``_at`` (the transforms' ``lax`` slicing) against numpy."""
  from mgtrain.nn.winograd import TILE, _at, _strided
  a = np.arange(2 * 14 * 9 * 3, dtype=np.float32).reshape(2, 14, 9, 3)
  for axis, size in ((1, 14), (2, 9)):
    for start in range(6):
      for length in (4, 8, 12):
        want = a[(slice(None),) * axis + (slice(start, start + length, TILE),)]
        np.testing.assert_array_equal(_strided(jnp.asarray(a), start, length, axis), want)
    for index in (0, size - 1):
      np.testing.assert_array_equal(_at(jnp.asarray(a), index, axis),
                                    np.take(a, index, axis=axis))
