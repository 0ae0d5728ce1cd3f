"""experiments/device_checks.sh: the prepared GPU checks, run here in smoke mode."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "device_checks.sh"


def _run(tmp_path, *args, **env):
  full_env = {**os.environ, "CONFIG": "smoke", "DEVICE": "cpu", "OUT": str(tmp_path / "out"),
              "WORK": str(tmp_path / "work"),
              # The script runs `python3`; make it this interpreter's.
              "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
  return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=600)


def test_part_2_writes_summary_log_and_results(tmp_path):
  proc = _run(tmp_path, "2", BUDGET_S="300")
  assert proc.returncode == 0, proc.stderr
  out = tmp_path / "out"
  assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.tar.gz", "summary.md"]
  summary = (out / "summary.md").read_text()
  for name in ("unet_steps_128", "levers_sequential", "levers_bfloat16"):
    assert f"## {name} (rc 0," in summary
  # Each lever's table, with both of its variants timed.
  assert summary.count("| resnet | 16 | by-mesh | float32 | off |") == 2
  assert "| resnet | 16 | by-mesh | float32 | on |" in summary
  assert "| resnet | 16 | by-mesh | bfloat16 | off |" in summary
  with tarfile.open(out / "results.tar.gz") as tar:
    names = tar.getnames()
  assert "./unet_steps_128/benchmark.json" in names
  assert "./levers_sequential/levers.json" in names
  assert "./levers_bfloat16/levers.md" in names


def test_part_3_cold_compiles_in_fresh_processes_under_each_flag(tmp_path):
  proc = _run(tmp_path, "3", BUDGET_S="300")
  assert proc.returncode == 0, proc.stderr
  summary = (tmp_path / "out" / "summary.md").read_text()
  names = ("first_step_cold_default", "first_step_cold_autotune1",
           "first_step_cold_parallel16", "first_step_cold_threefry_kernel", "levers_autotune",
           "levers_bfloat16_256")
  for name in names:
    assert f"## {name} (rc 0," in summary
  # Each cold run's table has its one row, and the flag reached its process.
  assert summary.count("| by-mesh | cold |") == 4
  # No flag changed the initial parameters (on CPU none of them can).
  digests = {line.rsplit("|", 2)[-2].strip() for line in summary.splitlines()
             if "| by-mesh | cold |" in line}
  assert len(digests) == 1 and len(digests.pop()) == 12
  assert "env XLA_FLAGS=" in summary and "--xla_gpu_autotune_level=1 python3" in summary
  assert '`{"xla_gpu_autotune_level": 1}`' in summary
  with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
    got = tar.getnames()
  assert "./first_step_cold_autotune1/benchmark.json" in got
  # The cold runs' caches stay behind, as every compilation cache does.
  assert not [n for n in got if "first_step_cache" in n]


def test_sections_past_the_budget_are_skipped_not_started(tmp_path):
  proc = _run(tmp_path, "1", BUDGET_S="10")
  assert proc.returncode == 0, proc.stderr
  summary = (tmp_path / "out" / "summary.md").read_text()
  for name in ("resnet_steps", "mfc", "first_step", "unet_steps_64"):
    assert f"## {name}: skipped" in summary
  assert "experiments.benchmark" not in (tmp_path / "out" / "log.txt").read_text()


@pytest.mark.parametrize("args, env, message", [
    (("4",), {}, "usage"),
    (("1",), {"CONFIG": "paper"}, "CONFIG must be gpu or smoke"),
])
def test_bad_arguments_are_refused(tmp_path, args, env, message):
  proc = _run(tmp_path, *args, **env)
  assert proc.returncode == 2
  assert message in proc.stderr
