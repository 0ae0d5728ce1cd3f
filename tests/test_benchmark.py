"""The benchmark CLI writes its JSON and table; unbuilt sections say so."""

import json

import pytest

from experiments import benchmark


def test_smoke_benchmark_writes_json_and_ratios(tmp_path):
  out = benchmark.main(["--config", "smoke", "--repeats", "1", "--workdir", str(tmp_path)])
  saved = json.loads((tmp_path / "benchmark.json").read_text())
  (row,) = saved["steps"]
  assert set(row) >= {"single_b1", "mge2", "single_b3", "speed_ratio", "wu_ratio"}
  # One 2-level step, batches 1/2: the correction 1 * (1 + 1/4) plus the coarse 2 * 1/4.
  assert row["mge2"]["work_units_per_step"] == pytest.approx(1.75)
  assert row["wu_ratio"] == pytest.approx(3 / 1.75)
  assert all(row[k]["seconds_per_step"] > 0 for k in ("single_b1", "mge2", "single_b3"))
  (mfc,) = saved["mfc"]
  assert mfc["mfc_forward_backward"] > 0 and mfc["conv3x3_forward_backward"] > 0
  assert "| resnet | 16 |" in (tmp_path / "benchmark.md").read_text()
  assert out["backend"] == "cpu"


def test_sections_not_built_yet_raise_not_implemented(tmp_path):
  with pytest.raises(NotImplementedError, match="issue 8"):
    benchmark.main(["--config", "smoke", "--sections", "torch", "--workdir", str(tmp_path)])
