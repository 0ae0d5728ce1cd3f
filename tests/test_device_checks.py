"""experiments/device_checks.sh: the prepared GPU checks, run here in smoke mode.

Parts 3, 4 and 5 are in test_device_checks_compile.py,
test_device_checks_profiles.py and test_device_checks_training.py, so that pytest-xdist's
``--dist loadfile`` can give them to another worker.
"""

import tarfile

import pytest


def test_part_2_writes_summary_log_and_results(tmp_path, run_device_checks):
  proc = run_device_checks("2", BUDGET_S="300")
  assert proc.returncode == 0, proc.stderr
  out = tmp_path / "out"
  assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.tar.gz", "summary.md"]
  summary = (out / "summary.md").read_text()
  for name in ("unet_steps_128", "levers_sequential", "levers_bfloat16"):
    assert f"## {name} (rc 0," in summary
  # Smoke mode times the ResNet's steps in the UNet's section.
  assert "--sections steps --models resnet --mge by-mesh --skip-same-samples" in summary
  # Each lever's table, with both of its variants timed.
  assert summary.count("| resnet | 16 | by-mesh | float32 | off |") == 2
  assert "| resnet | 16 | by-mesh | float32 | on |" in summary
  assert "| resnet | 16 | by-mesh | bfloat16 | off |" in summary
  with tarfile.open(out / "results.tar.gz") as tar:
    names = tar.getnames()
  assert "./unet_steps_128/benchmark.json" in names
  assert "./levers_sequential/levers.json" in names
  assert "./levers_bfloat16/levers.md" in names


def test_sections_past_the_budget_are_skipped_not_started(tmp_path, run_device_checks):
  proc = run_device_checks("1", BUDGET_S="10")
  assert proc.returncode == 0, proc.stderr
  summary = (tmp_path / "out" / "summary.md").read_text()
  for name in ("resnet_steps", "mfc", "first_step", "unet_steps_64"):
    assert f"## {name}: skipped" in summary
  assert "experiments.benchmark" not in (tmp_path / "out" / "log.txt").read_text()


@pytest.mark.parametrize("args, env, message", [
    (("6",), {}, "usage"),
    (("1",), {"CONFIG": "paper"}, "CONFIG must be gpu or smoke"),
])
def test_bad_arguments_are_refused(run_device_checks, args, env, message):
  proc = run_device_checks(*args, **env)
  assert proc.returncode == 2
  assert message in proc.stderr
