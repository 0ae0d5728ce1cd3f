"""Conv3x3Dispatch: which 3x3 convolutions take im2col, Winograd or XLA's direct conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conv_reference import primitives
from mgtrain.nn.conv_dispatch import ALGORITHMS, Conv3x3Dispatch

DN = ("NHWC", "HWIO", "NHWC")


def _choice(batch, mesh, c_in, c_out, dtype=jnp.float32, dispatch=Conv3x3Dispatch(), **kw):
  x = jax.ShapeDtypeStruct((batch, mesh, mesh, c_in), dtype)
  w = jax.ShapeDtypeStruct((3, 3, c_in, c_out), dtype)
  kw = {"window_strides": (1, 1), "padding": "SAME", **kw}
  return dispatch.choose(x, w, dimension_numbers=DN, **kw)


def test_tiny_meshes_take_im2col_whatever_the_width_batch_and_dtype():
  for batch, mesh, c_in, c_out in [(192, 2, 128, 128), (1, 2, 3, 32), (16, 1, 8, 8),
                                   (192, 2, 256, 128)]:
    assert _choice(batch, mesh, c_in, c_out) == "im2col"
  assert _choice(192, 2, 128, 128, jnp.bfloat16) == "im2col"
  assert _choice(192, 3, 128, 128) == "winograd"      # 3 x 3 is not tiny: 1,728 px at 128 ch
  assert _choice(192, 3, 128, 128, dispatch=Conv3x3Dispatch(im2col_max_side=3)) == "im2col"
  assert _choice(192, 2, 128, 128, window_strides=(2, 2)) == "direct"
  x, w = jnp.ones((4, 2, 2, 8)), jax.random.normal(jax.random.key(0), (3, 3, 8, 8))
  conv = Conv3x3Dispatch()
  assert "conv_general_dilated" not in primitives(
      lambda x, w: conv(x, w, (1, 1), "SAME", dimension_numbers=DN), x, w)
  np.testing.assert_allclose(conv(x, w, (1, 1), "SAME", dimension_numbers=DN),
                             jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                          dimension_numbers=DN),
                             rtol=1e-5, atol=1e-5)


def test_winograd_only_for_wide_same_3x3_float_convolutions():
  conv = Conv3x3Dispatch()
  wide = jnp.ones((1, 64, 64, 32)), jnp.ones((3, 3, 32, 32))
  # Taken: no convolution left in the program.
  assert _choice(1, 64, 32, 32) == "winograd"
  assert "conv_general_dilated" not in primitives(
      lambda x, w: conv(x, w, (1, 1), "SAME", dimension_numbers=DN), *wide)
  assert "conv_general_dilated" not in primitives(
      lambda x, w: conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN), *wide)
  # Not taken, and then exactly lax's result.
  cases = [
      (wide, dict(window_strides=(2, 2), padding="SAME")),
      (wide, dict(window_strides=(1, 1), padding="VALID")),
      (wide, dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 2))),
      ((jnp.ones((1, 64, 64, 32)), jnp.ones((5, 5, 32, 32))),
       dict(window_strides=(1, 1), padding="SAME")),
      ((jnp.ones((1, 64, 64, 3)), jnp.ones((3, 3, 3, 32))),          # too few channels
       dict(window_strides=(1, 1), padding="SAME")),
      ((jnp.ones((1, 8, 8, 64)), jnp.ones((3, 3, 64, 64))),           # too few pixels
       dict(window_strides=(1, 1), padding="SAME")),
      ((jnp.ones((1, 64, 64, 32), jnp.bfloat16), jnp.ones((3, 3, 32, 32), jnp.bfloat16)),
       dict(window_strides=(1, 1), padding="SAME")),
  ]
  for (x, w), kw in cases:
    assert conv.choose(x, w, dimension_numbers=DN, **kw) == "direct", kw
    assert "conv_general_dilated" in primitives(
        lambda x, w: conv(x, w, dimension_numbers=DN, **kw), x, w), kw
    np.testing.assert_array_equal(conv(x, w, dimension_numbers=DN, **kw),
                                  jax.lax.conv_general_dilated(x, w, dimension_numbers=DN, **kw))
  # NCHW operands are not what the other forms compute, even on a tiny mesh.
  assert "conv_general_dilated" in primitives(
      lambda x, w: conv(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")),
      jnp.ones((1, 32, 2, 2)), jnp.ones((32, 32, 3, 3)))


def test_winograd_thresholds_depend_on_the_layer_width():
  conv = Conv3x3Dispatch()
  assert [conv.winograd_min_pixels(c) for c in (3, 31, 32, 64, 96, 128, 191, 192, 512)] == [
      None, None, 4096, 4096, 1024, 1024, 1024, 2048, 2048]
  assert _choice(16, 8, 128, 128) == "winograd"      # 1,024 pixels: wide enough
  assert _choice(16, 8, 64, 64) == "direct"          # needs 4,096 at 64 channels
  assert _choice(16, 8, 64, 128) == "direct"         # the narrower side counts
  assert _choice(16, 8, 256, 256) == "direct"        # needs 2,048 at 256 channels
  assert _choice(32, 8, 256, 256) == "winograd"
  assert _choice(16, 8, 128, 128, jnp.bfloat16) == "direct"
  # A custom table.
  assert Conv3x3Dispatch(winograd_thresholds=((8, 64),)).winograd_min_pixels(8) == 64
  assert set(ALGORITHMS) == {"direct", "im2col", "winograd"}


@pytest.mark.parametrize("mesh", [2, 8])
def test_flax_conv_with_the_dispatcher_matches_lax_and_keeps_its_repr(mesh):
  # The step cache keys on repr(module); a function attribute would put its
  # address there.
  a = nn.Conv(8, (3, 3), conv_general_dilated=Conv3x3Dispatch())
  b = nn.Conv(8, (3, 3), conv_general_dilated=Conv3x3Dispatch())
  assert repr(a) == repr(b) and "0x" not in repr(a)
  x = jax.random.normal(jax.random.key(0), (64, mesh, mesh, 32))
  plain = nn.Conv(8, (3, 3))
  params = plain.init(jax.random.key(1), x)
  np.testing.assert_allclose(a.apply(params, x), plain.apply(params, x), rtol=1e-4, atol=1e-4)
