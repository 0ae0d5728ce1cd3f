"""experiments/device_checks.sh part 5 (a Full-Multiscale run without and
with --compile-ahead), in smoke mode on CPU."""

import json
import tarfile


def test_part_5_trains_full_multiscale_both_ways(tmp_path, run_device_checks):
  proc = run_device_checks("5", BUDGET_S="300")
  assert proc.returncode == 0, proc.stderr
  summary = (tmp_path / "out" / "summary.md").read_text()
  for name in ("full_multiscale_compile_ahead_off", "full_multiscale_compile_ahead_on"):
    assert f"## {name} (rc 0," in summary
  assert summary.count("| full-multiscale |") == 2
  with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
    results = {
        mode: json.load(tar.extractfile(
            f"./full_multiscale_compile_ahead_{mode}/results.json"))
        for mode in ("off", "on")}
  assert results["off"]["compile_ahead"] is False and results["on"]["compile_ahead"] is True
  # The same run either way; only where the later stages compiled differs.
  assert results["on"]["metrics"] == results["off"]["metrics"]
  assert results["on"]["stages"][1]["background_compile_seconds"] > 0
