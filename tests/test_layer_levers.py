"""Each layer lever computes its default's function: values and gradients agree."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import layer_levers


def _value_and_grads(f, inputs):
  # One program: eager, the Winograd variant compiled every op on its own (18 s).
  loss = lambda *a: 0.5 * jnp.sum(jnp.square(f(*a)))
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(inputs)))))(*inputs)


@pytest.mark.parametrize("lever", layer_levers.LEVERS)
def test_every_variant_matches_the_default_in_value_and_gradient(lever):
  inputs, variants = layer_levers.lever_problems(lever, 8, 2, 4)
  (default, *others) = variants.values()
  ref_value, ref_grads = _value_and_grads(default, inputs)
  for f in others:
    value, grads = _value_and_grads(f, inputs)
    np.testing.assert_allclose(value, ref_value, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(r))))


def test_winograd_matches_a_direct_3x3_correlation_on_a_non_square_image():
  x = jax.random.normal(jax.random.key(0), (1, 6, 10, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 2))
  p = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  direct = np.zeros((1, 6, 10, 2), np.float32)
  for i in range(3):
    for j in range(3):
      direct += np.einsum("nhwc,cd->nhwd", p[:, i:i + 6, j:j + 10], np.asarray(w[i, j]))
  np.testing.assert_allclose(jax.jit(layer_levers.winograd_conv3x3)(x, w), direct, atol=1e-4)


def test_winograd_rejects_odd_images_and_wrong_kernels():
  with pytest.raises(ValueError, match="even height and width"):
    layer_levers.winograd_conv3x3(jnp.zeros((1, 7, 8, 2)), jnp.zeros((3, 3, 2, 2)))
  with pytest.raises(ValueError, match="kernel"):
    layer_levers.winograd_conv3x3(jnp.zeros((1, 8, 8, 2)), jnp.zeros((5, 5, 2, 2)))


def test_unknown_lever_is_an_error():
  with pytest.raises(ValueError, match="lever must be one of"):
    layer_levers.lever_problems("im2col", 8, 2, 4)
  with pytest.raises(SystemExit):
    layer_levers.parse_args(["--levers", "winograd", "--size", "9"])


def test_smoke_cli_writes_json_and_table(tmp_path):
  rows = layer_levers.main(["--config", "smoke", "--workdir", str(tmp_path)])
  assert [r["lever"] for r in rows] == list(layer_levers.LEVERS)
  saved = json.loads((tmp_path / "layer_levers.json").read_text())["rows"]
  for row in saved:
    assert set(row["seconds"]) == set(row["speedup_over_default"])
    assert all(t > 0 for t in row["seconds"].values())
    assert max(row["max_relative_difference"].values()) < 1e-4
  table = (tmp_path / "layer_levers.md").read_text()
  assert "winograd_f2x2_3x3" in table and "winograd_f4x4_3x3" in table
