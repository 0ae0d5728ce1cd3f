"""mgtrain.profiling: HLO parsing, folding trace events, and a real trace."""

import jax
import jax.numpy as jnp
import pytest

from mgtrain import profiling

HLO = """HloModule jit_f, entry_computation_layout={(f32[4,8]{1,0})->f32[4,5]{1,0}}

%fused_computation (param_0: c64[4,5]) -> c64[4,5] {
  %param_0 = c64[4,5]{1,0} parameter(0)
  ROOT %multiply.1 = c64[4,5]{1,0} multiply(%param_0, %param_0)
}

ENTRY %main.5 (x.1: f32[4,8]) -> (f32[4,8], f32[]) {
  %x.1 = f32[4,8]{1,0} parameter(0)
  %fft.0 = c64[4,5]{1,0} fft(%x.1), fft_type=RFFT, fft_length={8}
  %multiply_fusion = c64[4,5]{1,0} fusion(%fft.0), kind=kLoop, calls=%fused_computation
  ROOT %tuple = (f32[4,8]{1,0}, f32[]) tuple(%x.1, %x.1)
}
"""


def test_hlo_instructions_reads_opcodes_shapes_and_fusion_kinds():
  table = profiling.hlo_instructions(HLO)
  assert table["fft.0"] == ("fft", "c64[4,5]")
  assert table["multiply_fusion"] == ("fusion(kLoop)", "c64[4,5]")
  assert table["multiply.1"] == ("multiply", "c64[4,5]")    # fused bodies too
  assert table["tuple"] == ("tuple", "(f32[4,8], f32[])")
  assert "HloModule" not in table and "fused_computation" not in table


def _event(name, ts, dur, tid=1, **args):
  return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def test_op_times_fold_events_per_call_and_drop_foreign_ones():
  table = profiling.hlo_instructions(HLO)
  lanes = {(1, 1): "tf_XLAEigen/123", (1, 2): "tf_XLAEigen/-456", (1, 3): "python"}
  events = [_event("fft.0", 0, 3000, tid=1), _event("fft.0", 10_000, 1000, tid=2),
            _event("multiply_fusion", 2000, 2000, tid=3),
            _event("PjitFunction(f)", 0, 20_000, tid=3),        # not an instruction
            _event("kernel_xyz", 5000, 500, tid=3, hlo_op="multiply_fusion")]  # GPU style
  ops = {op.name: op for op in profiling.op_times(events, lanes, table, calls=2)}
  assert set(ops) == {"fft.0", "multiply_fusion"}
  assert ops["fft.0"].seconds == pytest.approx(2e-3) and ops["fft.0"].events == 1
  assert ops["fft.0"].lanes == ("tf_XLAEigen x2",)
  assert ops["multiply_fusion"].seconds == pytest.approx(1.25e-3)
  assert ops["multiply_fusion"].lanes == ("python",)
  # Union of [0,3] [2,4] [5,5.5] [10,11] ms = 5.5 ms over 2 calls.
  assert profiling.covered_seconds(events, table, calls=2) == pytest.approx(2.75e-3)
  with pytest.raises(ValueError, match="calls"):
    profiling.op_times(events, lanes, table, calls=0)


def test_profile_of_a_real_program_finds_its_ffts(tmp_path):
  f = jax.jit(lambda x, w: jnp.fft.irfft2(jnp.fft.rfft2(x @ w) * 2.0, s=x.shape[-2:]))
  x, w = jnp.ones((4, 32, 32)), jnp.eye(32)
  compiled = f.lower(x, w).compile()
  prof = profiling.profile(compiled, x, w, calls=2, logdir=tmp_path)
  # The matmul is a dot, or a YNNPACK fusion where XLA hands dots to YNNPACK.
  assert len(prof.ops) >= 4
  ffts = [op for op in prof.ops if op.opcode == "fft"]
  assert len(ffts) == 2 and all(op.events == 1 for op in ffts)
  assert list(prof.ops) == sorted(prof.ops, key=lambda op: -op.seconds)
  assert 0 < prof.covered_seconds <= prof.wall_seconds
  table = profiling.profile_table(prof, top=1)
  assert "| instruction | opcode |" in table and "more)" in table and "| fft |" in table
  assert set(prof.to_dict()) >= {"ops", "by_opcode", "wall_seconds", "uncovered_seconds"}
  with pytest.raises(FileNotFoundError, match="trace"):
    profiling.trace_events(tmp_path / "empty")
