"""experiments/device_checks.sh part 5 (a Full-Multiscale run with
--compile-ahead), in smoke mode on CPU. The run without it is left out
there: tests/test_denoise_cli.py trains it already."""

import json
import tarfile


def test_part_5_trains_full_multiscale_compiling_ahead(tmp_path, run_device_checks):
  proc = run_device_checks("5", BUDGET_S="300")
  assert proc.returncode == 0, proc.stderr
  summary = (tmp_path / "out" / "summary.md").read_text()
  assert "## full_multiscale_compile_ahead_on (rc 0," in summary
  assert "full_multiscale_compile_ahead_off" not in summary
  assert summary.count("| full-multiscale |") == 1
  with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
    result = json.load(tar.extractfile("./full_multiscale_compile_ahead_on/results.json"))
  assert result["compile_ahead"] is True
  assert result["work_units"] == result["work_units_closed_form"]
  # The first stage compiles in the loop, the later ones in the background.
  background = [stage["background_compile_seconds"] for stage in result["stages"]]
  assert background[0] == 0.0 and all(b > 0 for b in background[1:])
