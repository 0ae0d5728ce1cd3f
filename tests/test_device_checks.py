"""experiments/device_checks.sh: the prepared GPU checks, run here in smoke mode.

Parts 3, 4 and 5 are in test_device_checks_compile.py,
test_device_checks_profiles.py and test_device_checks_training.py, so that pytest-xdist's
``--dist loadfile`` can give them to another worker.
"""

import re
import shlex
import tarfile

import pytest

from experiments import benchmark, denoise, levers, profile_step


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


# Every section of each part on the GPU, in order: smoke mode runs only some.
GPU_SECTIONS = {
    "1": ("resnet_steps", "mfc", "first_step", "unet_steps_64"),
    "2": ("unet_steps_128", "levers_sequential", "levers_bfloat16"),
    "3": ("first_step_cold_default", "first_step_split", "levers_split",
          "first_step_cold_autotune1", "first_step_cold_threefry_kernel",
          "first_step_cold_init_on_cpu", "levers_autotune", "first_step_cold_parallel16",
          "levers_bfloat16_256"),
    "4": ("profile_resnet_mge", "profile_resnet_b16", "profile_resnet_mge_no_command_buffers",
          "profile_mfc_layer", "profile_conv3x3_layer", "profile_unet_mge",
          "levers_unet_bfloat16"),
    "5": ("full_multiscale_compile_ahead_off", "full_multiscale_compile_ahead_on"),
}
PARSERS = {"experiments.benchmark": benchmark.parse_args, "experiments.levers": levers.parse_args,
           "experiments.profile_step": profile_step.parse_args,
           "experiments.denoise": denoise.parse_args}


@pytest.mark.parametrize("part, device", [(part, "") for part in sorted(GPU_SECTIONS)]
                         + [("1", "gpu"), ("4", "gpu")])
def test_dry_run_lists_every_gpu_section_and_its_module_parses_each_command(
    tmp_path, run_device_checks, part, device):
  proc = run_device_checks(part, DRY_RUN="1", CONFIG="gpu", DEVICE=device,
                           XLA_FLAGS="--xla_inherited", BUDGET_S="540")
  assert proc.returncode == 0, proc.stderr
  out = tmp_path / "out"
  # Nothing ran: no results, no scratch folder.
  assert sorted(p.name for p in out.iterdir()) == ["log.txt", "summary.md"]
  assert not (tmp_path / "work").exists()
  sections = re.findall(r"^## (\S+) \(dry run, limit (\d+)s\)\n\n`(.+)`$",
                        (out / "summary.md").read_text(), re.MULTILINE)
  assert tuple(name for name, _, _ in sections) == GPU_SECTIONS[part]
  parsed = {}
  for name, limit, command in sections:
    assert 20 <= int(limit) <= 540
    words = shlex.split(command)
    env = {}
    if words[0] == "env":
      words.pop(0)
      while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["python3", "-m"], command
    args = PARSERS[words[2]](words[3:])
    assert args.workdir == str(tmp_path / "work" / name)
    if words[2] in ("experiments.benchmark", "experiments.profile_step"):
      assert args.device == (device or None)     # DEVICE, else what JAX finds
    # The GPU's own flags go after the caller's XLA_FLAGS.
    flags = env.get("XLA_FLAGS", "--xla_inherited").split()
    assert flags[0] == "--xla_inherited" and all(f.startswith("--xla_gpu_") for f in flags[1:])
    parsed[name] = args, env
  if part == "1":
    args, _ = parsed["resnet_steps"]
    assert args.config == "gpu" and args.sizes == [64, 128, 256] and args.repeats == 10
  elif part == "3":
    assert parsed["levers_autotune"][0].options == [{}, {"xla_gpu_autotune_level": 1}]
    assert parsed["first_step_cold_init_on_cpu"][0].init_platform == "cpu"
    assert parsed["first_step_cold_threefry_kernel"][1] == {
        "JAX_THREEFRY_GPU_KERNEL_LOWERING": "true"}
    assert parsed["levers_bfloat16_256"][0].compute_dtype == ["float32", "bfloat16"]
  elif part == "4":
    assert parsed["profile_unet_mge"][0].config == "paper"
    assert parsed["levers_unet_bfloat16"][0].sizes == [128]
  elif part == "5":
    assert parsed["full_multiscale_compile_ahead_on"][0].config == "cpu4"
