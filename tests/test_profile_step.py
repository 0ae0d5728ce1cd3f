"""experiments.profile_step: the per-instruction profile CLI, smoke config."""

import collections
import json
import re

import pytest

from experiments import denoise, profile_step


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
  if saved["program"] == "step":   # the benchmark's chunk rule, by the finest mesh
    assert saved["chunk_pixels"] == denoise.default_chunk_pixels("cpu", 16)
  if "bfloat16" in argv:
    # (XLA CPU may rewrite a bf16 conv into an f32 one between converts, so
    # the profiled shapes are not checked; tests/test_compute_dtype.py checks
    # the lowered program.)
    assert saved["compute_dtype"] == "bfloat16"
  md = (tmp_path / "profile.md").read_text()
  assert "| instruction | opcode | shape | ms / call |" in md


def _batches_of_16x16_activations(profile: dict) -> collections.Counter:
  """How many profiled instructions write ``f32[B,16,16,C]``, by ``B``."""
  return collections.Counter(int(m.group(1)) for op in profile["ops"]
                             if (m := re.fullmatch(r"f32\[(\d+),16,16,\d+\]", op["shape"])))


def test_chunk_pixels_cuts_the_profiled_pass_into_chunks(tmp_path):
  """``--chunk-pixels 256`` cuts a pass of 4 images of 16^2 into chunks of
  one image: the model's activations then have batch 1 (a whole pass has
  about 20 instructions writing batch 4). The chunks are unrolled here: a
  rolled chunk loop takes seconds a call at the suite's LLVM level 0."""
  out = profile_step.main(["--config", "smoke", "--step", "single", "--base-batch", "4",
                           "--chunk-pixels", "256", "--sequential", "off",
                           "--workdir", str(tmp_path)])
  assert out["chunk_pixels"] == 256
  batches = _batches_of_16x16_activations(out)
  assert batches[1] > 10 and batches[4] < 5   # the noisy batch is drawn whole
  assert "chunks of 256 px" in (tmp_path / "profile.md").read_text()


def test_profile_step_rejects_bad_sizes(tmp_path):
  with pytest.raises(SystemExit):
    profile_step.main(["--config", "smoke", "--calls", "0", "--workdir", str(tmp_path)])
