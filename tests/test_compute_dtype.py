"""bfloat16 compute with float32 parameters (the models' ``dtype`` attribute).

The checks: the parameters are the float32 model's (same tree, same dtypes),
every spatial convolution of the lowered forward and backward pass runs in
bfloat16 (nothing silently promotes a layer back to float32), and outputs and
gradients agree with the float32 model to bfloat16's precision.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import denoise
from experiments.benchmark import _bench_model
from mgtrain.nn import init_params
from mgtrain.nn.convs import get_conv
from mgtrain.nn.resnet import ResNet
from mgtrain.nn.unet import UNet

SMALL_UNET = dict(base_channels=16, channel_mult=(1, 2), groups=4, emb_features=32)

MODELS = {
    "resnet": lambda dtype: ResNet(dtype=dtype),
    "mfc-resnet": lambda dtype: ResNet(conv=get_conv("mfc"), dtype=dtype),
    "spectral-resnet": lambda dtype: ResNet(conv=get_conv("spectral", modes=4), dtype=dtype),
    "unet": lambda dtype: UNet(**SMALL_UNET, dtype=dtype),
}


def _problem(size=16):
  u = jax.random.uniform(jax.random.key(1), (2, size, size, 3), minval=-1, maxval=1)
  return u, jnp.array([0.3, 0.7])


def _loss(model, u, t):
  return lambda p: jnp.mean(jnp.square(model.apply(p, u, t).astype(jnp.float32) - u))


def _flat(tree):
  return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


@jax.jit
def _perturbed(params):
  # The UNet's zero-initialised layers give an exactly zero output (and many
  # zero gradients) at init; perturb every parameter so that all layers act.
  # A deterministic pattern, not random draws: threefry for ~100 leaves takes
  # seconds to compile.
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      x + 0.05 * jnp.cos(0.7 * jnp.arange(x.size) + i).reshape(x.shape)
      for i, x in enumerate(leaves)])


def _result_dtypes(hlo: str, op: str) -> list[str]:
  """Element types of every ``op`` result in StableHLO text."""
  return re.findall(rf"stablehlo\.{op}\b.*?->\s*tensor<[^>]*?x?([a-z]+[0-9]+)>", hlo)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_params_stay_float32_and_convs_run_in_bfloat16(name):
  u, t = _problem()
  make = MODELS[name]
  # Shapes only: lowering needs no values, and eager Flax init is slow.
  p32 = jax.eval_shape(make(None).init, jax.random.key(0), u, t)
  p16 = jax.eval_shape(make(jnp.bfloat16).init, jax.random.key(0), u, t)
  assert jax.tree.structure(p16) == jax.tree.structure(p32)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p16))
  hlo = jax.jit(jax.grad(_loss(make(jnp.bfloat16), u, t))).lower(p32).as_text()
  convs = _result_dtypes(hlo, "convolution")
  assert convs and set(convs) == {"bf16"}, convs
  # The float32 model has no bfloat16 op at all.
  assert "bf16" not in jax.jit(jax.grad(_loss(make(None), u, t))).lower(p32).as_text()


@pytest.mark.parametrize("name", ["resnet", "mfc-resnet", "unet"])
def test_bfloat16_agrees_with_float32_to_its_precision(name):
  u, t = _problem()
  make = MODELS[name]
  m32, m16 = make(None), make(jnp.bfloat16)
  params = _perturbed(init_params(m32, jax.random.key(0), u, t))

  @jax.jit   # one program: eager Flax would compile every op on its own
  def both(p):
    return (m32.apply(p, u, t), m16.apply(p, u, t),
            jax.grad(_loss(m32, u, t))(p), jax.grad(_loss(m16, u, t))(p))

  y32, y16, grads32, grads16 = both(params)
  assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  rel = float(jnp.linalg.norm(y16.astype(jnp.float32) - y32) / jnp.linalg.norm(y32))
  assert rel < 3e-2   # bfloat16 keeps 8 bits: 2^-8 = 0.4% per rounding
  assert {x.dtype for x in jax.tree.leaves(grads16)} == {jnp.dtype(jnp.float32)}
  g32, g16 = _flat(grads32), _flat(grads16)
  cosine = float(g16 @ g32 / (jnp.linalg.norm(g16) * jnp.linalg.norm(g32)))
  assert cosine > 0.99
  assert float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32)) < 0.2


def test_denoising_loss_is_float32_and_models_take_the_flag():
  u, t = _problem()
  batch = {"u": u, "t": t, "y": u}
  model = denoise.build_model("resnet", "bfloat16")
  assert model.dtype == jnp.bfloat16
  params = init_params(model, jax.random.key(0), u, t)
  loss = denoise.make_loss_fn(model)(params, batch)
  assert loss.dtype == jnp.float32 and loss.shape == (2,)
  ref = denoise.make_loss_fn(denoise.build_model("resnet"))(params, batch)
  np.testing.assert_allclose(loss, ref, rtol=3e-2)
  assert _bench_model("unet", "bfloat16").dtype == jnp.bfloat16
  assert _bench_model("mfc-resnet").dtype is None


def test_unknown_compute_dtype_is_an_error():
  with pytest.raises(ValueError, match="unknown compute dtype 'float16'"):
    denoise.compute_dtype("float16")
  with pytest.raises(ValueError, match="unknown compute dtype"):
    denoise.build_model("resnet", "fp8")
