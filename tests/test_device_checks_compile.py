"""experiments/device_checks.sh part 3 (compile levers), in smoke mode on CPU.

Each part has its own file so that pytest-xdist's ``--dist loadfile`` can
spread them over its workers."""

import tarfile


def test_part_3_cold_compiles_in_fresh_processes_under_each_flag(tmp_path, run_device_checks):
  proc = run_device_checks("3", BUDGET_S="300")
  assert proc.returncode == 0, proc.stderr
  summary = (tmp_path / "out" / "summary.md").read_text()
  names = ("first_step_cold_default", "first_step_split", "first_step_cold_autotune1",
           "first_step_cold_init_on_cpu", "levers_split", "levers_autotune")
  for name in names:
    assert f"## {name} (rc 0," in summary
  # Left out in smoke mode: the bfloat16 lever would repeat part 2's, and two
  # GPU-only flags would repeat the default cold run.
  for name in ("levers_bfloat16_256", "first_step_cold_threefry_kernel",
               "first_step_cold_parallel16"):
    assert name not in summary
  # Each cold run's table has its one row, and the flag reached its process.
  assert summary.count("| by-mesh | cold |") == 3
  assert summary.count("| by-mesh split | cold |") == 1
  assert "--first-step-runs cold --init-platform cpu`" in summary
  # No flag changed the initial parameters (on CPU none of them can).
  digests = {line.rsplit("|", 2)[-2].strip() for line in summary.splitlines()
             if "| by-mesh | cold |" in line}
  assert len(digests) == 1 and len(digests.pop()) == 12
  assert "env XLA_FLAGS=" in summary and "--xla_gpu_autotune_level=1 python3" in summary
  assert '`{"xla_gpu_autotune_level": 1}`' in summary
  # The step as one program per mesh: three fresh processes (cold, warm, warm
  # step cache), then timed against one program in one process.
  for run in ("cold", "warm (XLA cache)", "warm (XLA + step cache)"):
    assert f"| by-mesh split | {run} |" in summary
  assert "| by-mesh | float32 |" in summary and "| by-mesh split | float32 |" in summary
  with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
    got = tar.getnames()
  assert "./first_step_cold_autotune1/benchmark.json" in got
  # The cold runs' caches stay behind, as every compilation cache does.
  assert not [n for n in got if "first_step_cache" in n]
