"""experiments/device_checks.sh part 3 (compile levers), in smoke mode on CPU.

Each part has its own file so that pytest-xdist's ``--dist loadfile`` can
spread them over its workers. The sections smoke mode leaves out are
checked from a dry run in test_device_checks.py."""

import tarfile


def test_part_3_cold_compiles_in_fresh_processes(tmp_path, run_device_checks):
  proc = run_device_checks("3", BUDGET_S="300")
  assert proc.returncode == 0, proc.stderr
  summary = (tmp_path / "out" / "summary.md").read_text()
  for name in ("first_step_split", "levers_split"):
    assert f"## {name} (rc 0," in summary
  # Left out in smoke mode: on CPU each would compile a program that
  # test_benchmark.py or a section above compiles already.
  for name in ("first_step_cold_default", "first_step_cold_autotune1",
               "first_step_cold_threefry_kernel",
               "first_step_cold_init_on_cpu", "levers_autotune", "first_step_cold_parallel16",
               "levers_bfloat16_256"):
    assert name not in summary
  # The step as one program per mesh, in three fresh processes (cold, warm,
  # warm step cache), each from the same initial parameters.
  runs = ("cold", "warm (XLA cache)", "warm (XLA + step cache)")
  for run in runs:
    assert summary.count(f"| by-mesh split | {run} |") == 1
  digests = {line.rsplit("|", 2)[-2].strip() for line in summary.splitlines()
             if any(f"| by-mesh split | {run} |" in line for run in runs)}
  assert len(digests) == 1 and len(digests.pop()) == 12
  # Then the split step timed against one program, in one process.
  assert "| by-mesh | float32 |" in summary and "| by-mesh split | float32 |" in summary
  with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
    got = tar.getnames()
  assert "./first_step_split/benchmark.json" in got
  # The cold runs' caches stay behind, as every compilation cache does.
  assert not [n for n in got if "first_step_cache" in n]
