"""Example 1 of the MFC paper (Tables 1-2): behaviour of experiments.gradient_discrepancy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gradient_discrepancy as gd


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """One --quick CLI run (finest 256, meshes 256..16, 32 noise draws), shared."""
  workdir = tmp_path_factory.mktemp("gd")
  results = gd.main(["--quick", "--workdir", str(workdir)])
  return workdir, results


def test_cli_writes_results_table_and_plot(quick, capsys):
  workdir, results = quick
  for name in ("results.json", "tables.md", "gradient_discrepancy.png"):
    assert (workdir / name).stat().st_size > 0
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["columns"] == ["1/256", "1/128", "1/64", "1/32"]
  assert saved["meshes"] == [256, 128, 64, 32, 16]
  text = (workdir / "tables.md").read_text()
  assert "Table 1 layout" in text and "Table 2 layout" in text
  assert "paper Table 1, noisy | 4.90e-03 | 2.80e-03 | 2.00e-03 | 1.70e-03" in text
  for ct in gd.CONV_TYPES:
    for row in gd.ROWS:
      assert len(saved["delta_g"][ct][row]) == 4
      assert all(v > 0 for v in saved["delta_g"][ct][row])


def test_standard_conv_noisy_discrepancy_does_not_decay(quick):
  _, r = quick
  dg = r["delta_g"]["conv"]["noisy_uy"]
  # Refining from 1/128 to 1/256 does not shrink it (noise modes enter at full weight) ...
  assert dg[0] > dg[1]
  # ... and the fitted order on the finest columns is not that of a decaying sequence.
  assert r["orders"]["conv"]["noisy_uy"]["finest_3"] < 0.5
  # The MFC sees the same noise exponentially damped.
  assert r["delta_g"]["mfc"]["noisy_uy"][0] < 1e-2 * dg[0]


def test_mfc_discrepancy_decays_for_every_input(quick):
  _, r = quick
  for row in gd.ROWS:
    dg = np.asarray(r["delta_g"]["mfc"][row])
    assert np.all(dg[:-1] < dg[1:]), (row, dg)       # finest column first
    assert r["orders"]["mfc"][row]["all"] > 1.0, row


def test_smooth_standard_conv_decays_like_h_squared(quick):
  # Lemma 1: ||g^h - g^2h|| = O(h), so Eq. 16's squared norm is O(h^2).
  _, r = quick
  assert 1.7 < r["orders"]["conv"]["smooth"]["all"] < 2.3
  # Noise in u alone is projected out by a smooth y: it decays too.
  assert r["orders"]["conv"]["noisy_u"]["all"] > 1.5


def test_conv_gradient_is_eq31_correlation():
  rng = np.random.default_rng(1)
  u, y = rng.standard_normal(16), rng.standard_normal(16)
  g = jax.grad(gd.conv_loss)(jnp.zeros(3), jnp.asarray(u), jnp.asarray(y))
  expected = [np.mean(y * np.roll(u, s)) for s in (1, 0, -1)]   # u_{j-1}, u_j, u_{j+1}
  np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-6)


def test_restriction_and_validation():
  v = np.arange(8.0)
  np.testing.assert_allclose(gd.restrict(v, 2), [1.5, 5.5])
  np.testing.assert_allclose(gd.restrict(gd.restrict(v, 4), 2), gd.restrict(v, 2))
  assert gd.mesh_sizes(64, 2) == (64, 32, 16)
  with pytest.raises(ValueError):
    gd.mesh_sizes(48, 2)
  with pytest.raises(ValueError):
    gd.restrict(v, 4, "bilinear")
  with pytest.raises(SystemExit):
    gd.main(["--finest", "16", "--columns", "6", "--workdir", "/nonexistent/never"])
