"""experiments.profile_step: the per-instruction profile CLI, smoke config."""

import json

import pytest

from experiments import profile_step


@pytest.mark.parametrize("argv, opcode", [
    (["--program", "layer", "--layer", "mfc"], "fft"),
    (["--program", "step", "--step", "single"], "convolution"),
    (["--program", "step", "--step", "single", "--compute-dtype", "bfloat16"], "convolution"),
])
def test_profile_step_writes_json_and_table(tmp_path, argv, opcode):
  out = profile_step.main(["--config", "smoke", "--workdir", str(tmp_path), *argv])
  saved = json.loads((tmp_path / "profile.json").read_text())
  assert saved["program"] == out["program"] and saved["calls"] == 1
  assert opcode in {op["opcode"] for op in saved["ops"]}
  assert saved["by_opcode"] and saved["wall_seconds"] > 0
  if "bfloat16" in argv:
    # (XLA CPU may rewrite a bf16 conv into an f32 one between converts, so
    # the profiled shapes are not checked; tests/test_compute_dtype.py checks
    # the lowered program.)
    assert saved["compute_dtype"] == "bfloat16"
  md = (tmp_path / "profile.md").read_text()
  assert "| instruction | opcode | shape | ms / call |" in md


def test_profile_step_rejects_bad_sizes(tmp_path):
  with pytest.raises(SystemExit):
    profile_step.main(["--config", "smoke", "--calls", "0", "--workdir", str(tmp_path)])
