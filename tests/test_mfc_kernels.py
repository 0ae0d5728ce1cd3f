"""MFC filters (Figure 3) and XLA FLOP tables (Table 11): experiments.mfc_kernels."""

import json

import numpy as np
import pytest

from experiments import mfc_kernels as mk
from mgtrain.nn import meshfree


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """One --quick CLI run (sizes 16, 32; kernels 3, 5, 7; 8 wide channels), shared."""
  workdir = tmp_path_factory.mktemp("mk")
  table = mk.main(["--quick", "--workdir", str(workdir)])
  return workdir, table


@pytest.mark.parametrize("length_scale", [1.0, 1.0 / 16, 0.3])
def test_raw_from_coefficients_round_trips(length_scale):
  rng = np.random.default_rng(0)
  s2 = length_scale ** 2
  a_xx = s2 * rng.uniform(0.2, 3.0, 8)
  a_yy = s2 * rng.uniform(0.2, 3.0, 8)
  a_xy = rng.uniform(-0.9, 0.9, 8) * np.sqrt(a_xx * a_yy)        # elliptic
  want = dict(tau=rng.uniform(0.01, 2.0, 8), a_xx=a_xx, a_xy=a_xy, a_yy=a_yy,
              g0=rng.normal(size=8), gx=length_scale * rng.normal(size=8),
              gy=length_scale * rng.normal(size=8))
  raw = mk.raw_from_coefficients(**want, length_scale=length_scale)
  assert raw.shape == (8, 7)
  got = meshfree.coefficients(raw, length_scale)._asdict()
  for name, value in want.items():
    np.testing.assert_allclose(np.asarray(got[name]), value, rtol=2e-5,
                               atol=1e-6 * max(1.0, float(np.abs(value).max())))


def test_raw_from_coefficients_edge_cases():
  raw = mk.raw_from_coefficients(0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0)
  assert float(meshfree.coefficients(raw).tau) == 0.0            # tau = 0: identity
  with pytest.raises(ValueError):
    mk.raw_from_coefficients(1.0, 1.0, 2.0, 3.0, 1.0, 0.0, 0.0)  # a_xy^2 > a_xx a_yy
  with pytest.raises(ValueError):
    mk.raw_from_coefficients(-1.0, 1.0, 0.0, 3.0, 1.0, 0.0, 0.0)


def test_filters_behave_as_figure3_says():
  size = 32
  row1, row2 = mk.figure3_coefficients(3)
  delta = mk.filter_image(row2[0], size)                          # tau = 0
  expected = np.zeros((size, size))
  expected[size // 2, size // 2] = 1.0
  np.testing.assert_allclose(delta, expected, atol=1e-5)
  plain = mk.filter_image(row1[0], size)                          # a_xy = gx = 0: Gaussian
  assert plain.sum() == pytest.approx(1.0, abs=1e-4)              # S(0) = g0 = 1
  assert plain.min() > -1e-3 * plain.max()                      # spectral ringing only
  c = size // 2
  np.testing.assert_allclose(plain[c, c - 3], plain[c, c + 3], rtol=1e-4)   # even in x
  assert plain[c + 3, c] > plain[c, c + 3]                        # a_yy = 3 > a_xx: taller
  lobed = mk.filter_image(row1[-1], size)                         # gx = 1: a signed lobe
  assert lobed.min() < -0.02 * lobed.max()
  wider = mk.filter_image(row2[-1], size)                         # tau = 1 > 1/2
  half = mk.filter_image(row2[1], size)
  assert wider.max() < half.max()                                 # wider, lower peak


def test_cli_writes_figure_and_tables(quick):
  workdir, _ = quick
  for name in ("mfc_filters.png", "flops.json", "flops.md"):
    assert (workdir / name).stat().st_size > 0
  saved = json.loads((workdir / "flops.json").read_text())
  assert saved["channels"] == 3 and saved["batch"] == 1
  assert "Table 11 layout" in (workdir / "flops.md").read_text()


def test_flop_table_positive_and_conv_grows_like_k_squared(quick):
  _, t = quick
  for k, row in t["conv"].items():
    assert all(v > 0 for v in row.values())
  assert all(v > 0 for v in t["mfc"].values())
  n = 32
  for k in (5, 7):
    ratio = t["conv"][k][n] / t["conv"][3][n]
    assert 0.75 * k * k / 9 < ratio < 1.05 * k * k / 9, (k, ratio)   # padding taps skipped
  # MFC cost does not depend on k and grows about like n^2 log n.
  assert 4.0 < t["mfc"][32] / t["mfc"][16] < 8.0
  wide = t["wide"]["forward"]
  assert wide["conv3x3"][32] > 3.5 * wide["conv3x3"][16]


def test_xla_fft_model_and_paper_formula(quick):
  _, t = quick
  for n, check in t["xla_fft_check"].items():
    assert check["xla"] == pytest.approx(check["model"], rel=1e-6), n
  for k, cells in mk.PAPER_TABLE11.items():
    for n, (conv, mfc) in zip(mk.IMAGE_SIZES, cells):
      assert mk.paper_formula("conv", n, k) == pytest.approx(conv, rel=5e-3)
      assert mk.paper_formula("mfc", n) == pytest.approx(mfc, rel=5e-3)


def test_xla_flops_accepts_dict_or_list(monkeypatch):
  class Fake:
    def __init__(self, value):
      self.value = value

    def lower(self, *args):
      return self

    def compile(self):
      return self

    def cost_analysis(self):
      return self.value

  monkeypatch.setattr(mk.jax, "jit", lambda f: Fake([{"flops": 2.0}, {"flops": 3.0}]))
  assert mk.xla_flops(None) == 5.0
  monkeypatch.setattr(mk.jax, "jit", lambda f: Fake({"flops": 7.0}))
  assert mk.xla_flops(None) == 7.0


def test_forward_backward_counts_the_forward_pass_too():
  fwd = mk.layer_flops("conv", 16, 4, 4, 3)
  both = mk.layer_flops("conv", 16, 4, 4, 3, backward=True)
  assert 2.5 * fwd < both < 4.0 * fwd          # forward + grad wrt input + grad wrt weights
