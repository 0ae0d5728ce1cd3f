"""direct_conv: lax.conv_general_dilated's values, with its kernel gradient as a forward conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgtrain.nn.conv_dispatch import Conv3x3Dispatch
from mgtrain.nn.direct_conv import direct_conv, input_gradient, kernel_gradient, \
    kernel_gradients_as_forward_convs

NHWC = ("NHWC", "HWIO", "NHWC")

# (input shape, kernel shape, strides, padding)
CASES = [
    ((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), "SAME"),
    ((2, 9, 7, 3), (3, 3, 3, 5), (2, 2), ((1, 1), (1, 1))),   # the UNet's downsampling
    ((3, 8, 8, 4), (1, 1, 4, 2), (1, 1), "SAME"),             # the ResNet's 1x1 maps
    ((2, 10, 10, 3), (3, 3, 3, 3), (2, 2), "SAME"),
    ((2, 10, 11, 3), (5, 3, 3, 3), (2, 3), "VALID"),
    ((1, 6, 6, 2), (3, 3, 2, 2), (1, 1), ((2, -1), (0, 1))),  # negative padding crops
]


def _operands(x_shape, w_shape):
  kx, kw = jax.random.split(jax.random.key(0))
  return jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)


def _loss(conv, strides, padding):
  return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=NHWC)))


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CASES)
def test_values_and_gradients_match_lax(x_shape, w_shape, strides, padding):
  x, w = _operands(x_shape, w_shape)
  ref = _loss(jax.lax.conv_general_dilated, strides, padding)
  new = _loss(direct_conv, strides, padding)
  with kernel_gradients_as_forward_convs():
    assert "custom_vjp" in str(jax.make_jaxpr(new)(x, w))
    np.testing.assert_allclose(new(x, w), ref(x, w), rtol=1e-6)
    for got, want in zip(jax.grad(new, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_outside_the_context_it_is_lax_itself():
  """XLA's own kernel gradient is as fast or faster outside loops, so the
  custom VJP is scoped; nested contexts restore the outer setting."""
  x, w = _operands(*CASES[1][:2])
  grads = lambda conv: str(jax.make_jaxpr(jax.grad(_loss(conv, *CASES[1][2:]), (0, 1)))(x, w))
  lax_grads = grads(jax.lax.conv_general_dilated)
  assert grads(direct_conv) == lax_grads
  with kernel_gradients_as_forward_convs():
    inside = grads(direct_conv)
    with kernel_gradients_as_forward_convs(False):
      assert grads(direct_conv) == lax_grads
    assert grads(direct_conv) == inside != lax_grads
  assert grads(direct_conv) == lax_grads


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CASES)
def test_kernel_gradient_is_the_sum_over_shifted_windows(x_shape, w_shape, strides, padding):
  """dL/dw[ky, kx] = sum_{n,h,w} x~[n, s h + ky, s w + kx] (x) dy[n, h, w], in numpy."""
  x, w = _operands(x_shape, w_shape)
  y = jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
  dy = jax.random.normal(jax.random.key(2), y.shape)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding)
  xp = np.asarray(x, np.float64)
  for axis, (lo, hi) in zip((1, 2), padding):
    pad = [(0, 0)] * 4
    pad[axis] = (max(lo, 0), max(hi, 0))
    xp = np.pad(xp, pad)
    index = [slice(None)] * 4
    index[axis] = slice(-min(lo, 0), xp.shape[axis] + min(hi, 0))
    xp = xp[tuple(index)]
  (kh, kw), (sh, sw), (_, ho, wo, _) = w_shape[:2], strides, y.shape
  want = np.zeros(w_shape)
  for ky in range(kh):
    for kx in range(kw):
      window = xp[:, ky:ky + sh * (ho - 1) + 1:sh, kx:kx + sw * (wo - 1) + 1:sw]
      want[ky, kx] = np.einsum("nhwi,nhwo->io", window, np.asarray(dy, np.float64))
  got = kernel_gradient(x, dy, (kh, kw), strides, tuple(padding))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CASES + [
    ((2, 16, 16, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1))),  # even sides, as in the UNet
    ((1, 11, 10, 2), (4, 2, 2, 3), (3, 2), ((2, 1), (0, 3))),
    ((1, 9, 9, 2), (1, 1, 2, 3), (2, 2), "VALID"),             # fewer taps than phases
    ((1, 12, 13, 2), (3, 3, 2, 2), (3, 3), ((-1, 2), (1, -2))),
    ((2, 7, 8, 3), (5, 5, 3, 2), (2, 1), "SAME"),
])
def test_input_gradient_by_phases_is_the_transpose(x_shape, w_shape, strides, padding):
  """input_gradient(dy) = the VJP of lax's convolution in its input, for any
  strides (those of a stride-1 conv included), kernel, mesh and padding."""
  x, w = _operands(x_shape, w_shape)
  conv = lambda x: jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
  y, vjp = jax.vjp(conv, x)
  dy = jax.random.normal(jax.random.key(3), y.shape)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding)
  got = input_gradient(dy, w, x_shape[1:3], strides, tuple(padding))
  assert got.shape == x.shape
  np.testing.assert_allclose(got, vjp(dy)[0], rtol=1e-5, atol=1e-5)


def test_strided_input_gradient_in_a_loop_body_is_by_phases():
  """Inside the context a strided conv's input gradient has no input-dilated
  convolution (the form XLA's CPU compiler runs slowly in a loop body)."""
  x, w = _operands(*CASES[1][:2])
  dilated = lambda jaxpr: "lhs_dilation=(2, 2)" in jaxpr
  grad = lambda conv: str(jax.make_jaxpr(jax.grad(_loss(conv, *CASES[1][2:])))(x, w))
  assert dilated(grad(jax.lax.conv_general_dilated))
  with kernel_gradients_as_forward_convs():
    assert not dilated(grad(direct_conv))


def test_gradient_inside_a_rolled_loop_matches_lax():
  """The case the module exists for: the kernel gradient inside a fori_loop body."""
  x, w = _operands((4, 8, 8, 3), (3, 3, 3, 4))

  def summed(conv):
    def loss(w):
      def body(i, total):
        xi = jax.lax.dynamic_slice_in_dim(x, 2 * i, 2)
        return total + jnp.sum(conv(xi, w, (2, 2), "SAME", dimension_numbers=NHWC) ** 2)
      return jax.lax.fori_loop(0, 2, body, jnp.zeros(()))
    return jax.jit(jax.grad(loss))(w)

  with kernel_gradients_as_forward_convs():
    np.testing.assert_allclose(summed(direct_conv), summed(jax.lax.conv_general_dilated),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    {"dimension_numbers": ("NCHW", "OIHW", "NCHW")},
    {"dimension_numbers": NHWC, "feature_group_count": 2},
    {"dimension_numbers": NHWC, "rhs_dilation": (2, 2)},
])
def test_other_convolutions_pass_through_to_lax(kwargs):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 4) if "feature_group_count" in kwargs
                        else (3, 3, 4, 4))
  if kwargs["dimension_numbers"][0] == "NCHW":
    x, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
  f = lambda conv: lambda x, w: jnp.sum(conv(x, w, (1, 1), "SAME", **kwargs) ** 2)
  with kernel_gradients_as_forward_convs():
    jaxpr = str(jax.make_jaxpr(jax.grad(f(direct_conv), (0, 1)))(x, w))
    assert "custom_vjp" not in jaxpr
    for got, want in zip(jax.grad(f(direct_conv), (0, 1))(x, w),
                         jax.grad(f(jax.lax.conv_general_dilated), (0, 1))(x, w)):
      np.testing.assert_allclose(got, want, rtol=1e-6)


def test_dispatch_computes_strided_and_1x1_convs_with_direct_conv():
  dispatch = Conv3x3Dispatch()
  x = jnp.ones((2, 8, 8, 4))
  for w, strides, padding in ((jnp.ones((1, 1, 4, 4)), (1, 1), "SAME"),
                              (jnp.ones((3, 3, 4, 4)), (2, 2), ((1, 1), (1, 1)))):
    conv = lambda x, w: dispatch(x, w, strides, padding, dimension_numbers=NHWC)
    with kernel_gradients_as_forward_convs():
      assert "custom_vjp" in str(jax.make_jaxpr(conv)(x, w))


def test_models_route_their_own_convs_through_the_dispatch_on_cpu():
  """The ResNet's 1x1 maps and the UNet's downsamplings are nn.Conv layers of their own."""
  from mgtrain.nn.resnet import ResNet
  from mgtrain.nn.unet import UNet
  if jax.default_backend() != "cpu":
    pytest.skip("the dispatch is the CPU's")
  for model, shape in ((ResNet(), (1, 8, 8, 3)), (UNet(), (1, 8, 8, 3))):
    x, t = jnp.zeros(shape), jnp.zeros((1,))
    # Shapes only: which conv each layer calls is fixed when the apply is
    # traced, and eager Flax would compile every op on its own (25 s here).
    params = jax.eval_shape(model.init, jax.random.key(0), x, t)
    convs = []
    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.Conv):
        convs.append((context.module.name, context.module.conv_general_dilated))
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(record):
      jax.eval_shape(model.apply, params, x, t)
    assert convs and all(isinstance(c, Conv3x3Dispatch) for _, c in convs), convs
