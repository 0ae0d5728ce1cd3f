"""experiments.winograd_thresholds: the grid behind the Winograd dispatcher's rows."""

import argparse
import json

import pytest

from experiments import winograd_thresholds as wt


def test_smoke_cli_writes_json_and_table(tmp_path):
  rows = wt.main(["--config", "smoke", "--workdir", str(tmp_path)])
  assert [(r["channels"], r["mesh"], r["batch"], r["pixels"]) for r in rows] == [(8, 4, 2, 32)]
  saved = json.loads((tmp_path / "winograd_thresholds.json").read_text())["rows"]
  assert saved[0]["direct_s"] > 0 and saved[0]["winograd_s"] > 0
  assert saved[0]["ratio"] == pytest.approx(saved[0]["winograd_s"] / saved[0]["direct_s"])
  # 8 channels is under the dispatcher's narrowest row.
  assert saved[0]["dispatcher_takes_winograd"] is False
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
