"""experiments/device_checks.sh parts 3 (compile levers) and 4 (profiles), in
smoke mode on CPU."""

import tarfile


def test_part_3_cold_compiles_in_fresh_processes_under_each_flag(tmp_path, run_device_checks):
  proc = run_device_checks("3", BUDGET_S="300")
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


def test_part_4_profiles_each_program(tmp_path, run_device_checks):
  proc = run_device_checks("4", BUDGET_S="300")
  assert proc.returncode == 0, proc.stderr
  summary = (tmp_path / "out" / "summary.md").read_text()
  names = ("profile_resnet_mge", "profile_resnet_b16", "profile_resnet_mge_no_command_buffers",
           "profile_mfc_layer", "profile_conv3x3_layer", "profile_unet_mge")
  for name in names:
    assert f"## {name} (rc 0," in summary
  # Every profile has its table of instructions, with the ops of its program.
  assert "## levers_unet_bfloat16 (rc 0," in summary
  assert summary.count("| instruction | opcode | shape | ms / call |") == len(names)
  assert "Profile of the unet mge-by-mesh train step" in summary
  assert "| fft |" in summary.split("## profile_mfc_layer")[1].split("## profile_conv3x3")[0]
  assert "--xla_gpu_enable_command_buffer= python3" in summary
  with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
    assert "./profile_unet_mge/profile.json" in tar.getnames()
