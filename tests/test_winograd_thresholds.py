"""experiments.winograd_thresholds: the grid behind the conv dispatcher's rules."""

import argparse
import json

import pytest

from experiments import winograd_thresholds as wt


def test_smoke_cli_writes_json_and_table(tmp_path):
  rows = wt.main(["--config", "smoke", "--workdir", str(tmp_path)])
  assert [(r["channels"], r["mesh"], r["batch"], r["pixels"]) for r in rows] == [(8, 4, 2, 32)]
  saved = json.loads((tmp_path / "winograd_thresholds.json").read_text())["rows"]
  assert min(saved[0][f"{a}_s"] for a in ("direct", "winograd", "im2col")) > 0
  for a in ("winograd", "im2col"):
    assert saved[0][f"{a}_ratio"] == pytest.approx(saved[0][f"{a}_s"] / saved[0]["direct_s"])
  # 8 channels is under the dispatcher's narrowest row.
  assert saved[0]["default_dispatch"] == "direct"
  assert "| 8 | 4² x 2 | 32 |" in (tmp_path / "winograd_thresholds.md").read_text()


def test_shapes_and_bad_arguments():
  assert wt.parse_shape("16x4") == (16, 4)
  for bad in ("16", "16x", "0x4", "axb"):
    with pytest.raises(argparse.ArgumentTypeError):
      wt.parse_shape(bad)
  args = wt.parse_args(["--channels", "128", "--shapes", "8x16", "16x4"])
  assert args.channels == [128] and args.shapes == [(8, 16), (16, 4)]
  with pytest.raises(SystemExit):
    wt.parse_args(["--channels", "0"])
