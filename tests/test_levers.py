"""experiments.levers: per-program XLA options A/B, unknown options reported, not fatal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import levers


def test_smoke_levers_time_variants_and_report_bad_options(tmp_path):
  rows = levers.main(["--config", "smoke", "--mge", "by-mesh", "--repeats", "1",
                      "--options", "{}", '{"xla_no_such_option": 1}',
                      "--workdir", str(tmp_path)])
  good, bad = rows
  assert good["seconds_per_step"] > 0 and good["compile_seconds"] > 0
  assert good["temp_bytes"] > 0
  assert good["ratio_to_first"] == 1.0        # the first variant against itself
  assert "xla_no_such_option" in bad["error"] and "seconds_per_step" not in bad
  assert (tmp_path / "levers.json").exists()


def test_smoke_levers_step_as_one_program_per_pass(tmp_path):
  one, split = levers.main(["--config", "smoke", "--mge", "terms", "--split-step", "off", "on",
                            "--repeats", "1", "--workdir", str(tmp_path)])
  assert not one["split_step"] and split["split_step"] and split["mge"] == "terms"
  assert split["seconds_per_step"] > 0 and split["temp_bytes"] > 0
  assert 0 < split["lower_seconds"] < split["compile_seconds"]
  assert "| terms split |" in (tmp_path / "levers.md").read_text()


def test_variants_are_timed_in_interleaved_rounds(monkeypatch):
  """Round r calls every variant once, in order, and ratios pair times by round."""
  calls = []
  clock = iter([0.0, 1.0, 1.0, 3.0,      # round 1: A 1 s, B 2 s
                3.0, 5.0, 5.0, 11.0,     # round 2: A 2 s, B 6 s
                11.0, 14.0, 14.0, 17.0])  # round 3: A 3 s, B 3 s
  monkeypatch.setattr("experiments.benchmark.time.perf_counter", lambda: next(clock))
  rows = levers.time_interleaved([{}, {}], [lambda: calls.append("A"),
                                            lambda: calls.append("B")], 3)
  assert calls == ["A", "B"] * 3
  assert rows[0]["samples"] == [1.0, 2.0, 3.0] and rows[1]["samples"] == [2.0, 6.0, 3.0]
  assert rows[1]["seconds_per_step"] == 3.0
  assert rows[1]["ratio_to_first"] == 2.0     # median of 2, 3 and 1


def test_smoke_levers_sampling_on_coarse_or_finest_meshes(tmp_path):
  coarse, fine = levers.main(["--config", "smoke", "--mge", "by-mesh", "--sampling", "coarse",
                              "fine", "--repeats", "1", "--workdir", str(tmp_path)])
  assert (coarse["sampling"], fine["sampling"]) == ("coarse", "fine")
  assert fine["seconds_per_step"] > 0
  table = (tmp_path / "levers.md").read_text()
  assert "| by-mesh fine sampling |" in table and "| by-mesh |" in table


def test_smoke_levers_level_parallel_on_two_fake_devices(tmp_path):
  """Each MGE term on its own (fake CPU) device, timed beside the one-device
  step. A fresh process: the device count is fixed when jax initialises."""
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
  proc = subprocess.run([sys.executable, "-m", "experiments.levers", "--config", "smoke",
                         "--mge", "terms", "--level-parallel", "off", "on", "--repeats", "1",
                         "--workdir", str(tmp_path)],
                        capture_output=True, text=True, env=env, timeout=600,
                        cwd=Path(__file__).resolve().parents[1])
  assert proc.returncode == 0, proc.stderr[-3000:]
  one, lp = json.loads((tmp_path / "levers.json").read_text())
  assert not one["level_parallel"] and lp["level_parallel"]
  assert lp["device_groups"] == [1, 1]           # the smoke step's two terms, a device each
  assert lp["seconds_per_step"] > 0 and lp["compile_seconds"] > 0
  assert lp["temp_bytes"] is None and lp["lower_seconds"] is None
  table = (tmp_path / "levers.md").read_text()
  assert "| terms level-parallel (1/1) |" in table and "| terms |" in table


@pytest.mark.parametrize("argv, message", [
    (["--mge", "by-mesh", "--level-parallel", "on"], "(given: --mge other than terms)"),
    (["--mge", "terms", "--level-parallel", "on", "--split-step", "on"],
     "(given: --split-step on)"),
    (["--mge", "terms", "--level-parallel", "on", "--options", '{"a": 1}', "--sequential",
      "off", "on"], "(given: --sequential on, --options)"),
    (["--mge", "terms", "--level-parallel", "on"], "at least one device per level"),
])
def test_level_parallel_refuses_what_it_cannot_run(tmp_path, capsys, argv, message):
  with pytest.raises(SystemExit):
    levers.main(["--config", "smoke", *argv, "--workdir", str(tmp_path)])
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, given", [
    (dict(mode="by-mesh"), "--mge other than terms"),
    (dict(mode="single", single_batch=3), "--mge other than terms, --single-batch"),
    (dict(split_step=True, sequential=True), "--split-step on, --sequential on"),
    (dict(options={"xla_cpu_use_onednn": False}), "--options"),
])
def test_compile_variant_refuses_a_level_parallel_step_it_cannot_run(kwargs, given):
  """The library call refuses what the CLI refuses, before anything compiles."""
  args = dict(model_name="resnet", size=16, levels=2, base_batch=1, mode="terms", options={},
              level_parallel_step=True)
  with pytest.raises(ValueError, match=f"cannot take: {given}$"):
    levers.compile_variant(**{**args, **kwargs})
