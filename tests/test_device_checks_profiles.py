"""experiments/device_checks.sh part 4 (profiles), in smoke mode on CPU."""

import tarfile


def test_part_4_profiles_each_program(tmp_path, run_device_checks):
  proc = run_device_checks("4", BUDGET_S="300")
  assert proc.returncode == 0, proc.stderr
  summary = (tmp_path / "out" / "summary.md").read_text()
  names = ("profile_resnet_mge", "profile_resnet_b16", "profile_mfc_layer",
           "profile_conv3x3_layer", "profile_unet_mge")
  for name in names:
    assert f"## {name} (rc 0," in summary
  # Left out in smoke mode: a GPU-only flag, and part 2's bfloat16 lever again.
  assert "no_command_buffers" not in summary and "levers_unet_bfloat16" not in summary
  # Every profile has its table of instructions, with the ops of its program.
  assert summary.count("| instruction | opcode | shape | ms / call |") == len(names)
  assert "Profile of the unet mge-by-mesh train step" in summary
  assert "| fft |" in summary.split("## profile_mfc_layer")[1].split("## profile_conv3x3")[0]
  with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
    assert "./profile_unet_mge/profile.json" in tar.getnames()
