"""The benchmark CLI writes its JSON and tables, and its set-ups match the papers."""

import json
import re

import pytest

from experiments import benchmark


def test_smoke_benchmark_writes_json_and_ratios(tmp_path):
  out = benchmark.main(["--config", "smoke", "--repeats", "1", "--sections", "steps", "mfc",
                        "--mge", "by-mesh", "--workdir", str(tmp_path)])
  saved = json.loads((tmp_path / "benchmark.json").read_text())
  (row,) = saved["steps"]
  assert set(row) >= {"single_b1", "mge2_by_mesh", "single_b3", "speed_ratio",
                      "wu_ratio", "memory_ratio"}
  # One 2-level step, batches 1/2: the correction 1 * (1 + 1/4) plus the coarse 2 * 1/4.
  assert row["mge2_by_mesh"]["work_units_per_step"] == pytest.approx(1.75)
  assert row["wu_ratio"] == pytest.approx(3 / 1.75)
  assert row["fastest_mge"] == "mge2_by_mesh"
  # Each step's #WU in base steps: 1.75 and 3 of the batch-1 step's 1.
  costs = row["in_base_steps"]
  assert costs["mge2_by_mesh"]["work_units"] == pytest.approx(1.75)
  assert costs["single_b3"]["work_units"] == pytest.approx(3)
  assert "in base steps" in (tmp_path / "benchmark.md").read_text()
  keys = ("single_b1", "mge2_by_mesh", "single_b3")
  assert all(row[k]["seconds_per_step"] > 0 and row[k]["temp_bytes"] > 0 for k in keys)
  (mfc,) = saved["mfc"]
  assert mfc["mfc_forward_backward"] > 0 and mfc["conv3x3_forward_backward"] > 0
  # On CPU the models' convs are Winograd, so the MFC is also set against that conv.
  assert mfc["mfc_over_winograd_forward_backward"] == pytest.approx(
      mfc["mfc_forward_backward"] / mfc["conv3x3_winograd_forward_backward"])
  assert "MFC / Winograd conv" in (tmp_path / "benchmark.md").read_text()
  # Timed in interleaved rounds: one round here, whose ratio is the ratio of medians.
  for other in ("conv", "winograd"):
    assert mfc[f"mfc_over_{other}_forward_backward_rounds"] == [
        pytest.approx(mfc[f"mfc_over_{other}_forward_backward"])]
  # The smoke layer's spectrum is small: its FFTs run unchunked, and the table says so.
  assert mfc["mfc_fft_chunking"] is None
  # On CPU a per-channel filter runs two images (of the smoke batch's 2) per complex FFT.
  assert mfc["batch"] == 2 and mfc["mfc_packs_images"] is True
  assert "| none; 2 |" in (tmp_path / "benchmark.md").read_text()
  # The host's speed is measured at both ends of the run, and the table's header says so.
  for when in ("start", "end"):
    speed = saved["host_speed"][when]
    assert speed["stream_gb_s"] > 0 and speed["matmul_gflop_s"] > 0
    assert (speed["stream_mib"], speed["matmul_n"]) == (16, 256)
  assert "Host speed" in (tmp_path / "benchmark.md").read_text()
  assert "MFC FFT chunks" in (tmp_path / "benchmark.md").read_text()
  # The default chunk size on CPU, by the finest mesh (16^2: 2^18), in both files.
  assert row["chunk_pixels"] == 2**18
  assert saved["chunk_pixels"].startswith("by finest mesh: 16384 from 128^2 up")
  assert "| resnet | 16 | 2^18 |" in (tmp_path / "benchmark.md").read_text()
  assert out["backend"] == "cpu"
  # --sequential auto: model passes one after another on CPU, said in both files.
  assert saved["sequential_passes"] is True and all(row[k]["sequential"] for k in keys)
  assert "one after another" in (tmp_path / "benchmark.md").read_text()
  # A figure per section, named in the table.
  for name in ("benchmark_steps.png", "benchmark_mfc.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert f"`{name}`" in (tmp_path / "benchmark.md").read_text()
  assert not (tmp_path / "benchmark_loss_eval.png").exists()


def test_split_single_times_every_step_split_with_chunk_programs(tmp_path):
  """--split-step --split-single: single-scale steps split too; at 16^2 with
  chunks of 2 images single b3 needs 3 chunk calls (an odd batch: chunks of 1)."""
  benchmark.main(["--config", "smoke", "--repeats", "1", "--sections", "steps", "--mge",
                  "by-mesh", "--split-step", "--split-single", "--chunk-pixels", "512",
                  "--workdir", str(tmp_path)])
  (row,) = json.loads((tmp_path / "benchmark.json").read_text())["steps"]
  assert all(row[k]["split_step"] for k in ("single_b1", "mge2_by_mesh_split", "single_b3"))
  assert row["single_b3"]["pass_chunk_calls"] == [3]
  assert row["single_b1"]["pass_chunk_calls"] == [1]
  assert row["chunk_pixels"] == 512
  assert row["speed_ratio"] > 0
  assert "single_b3 split s/step" in (tmp_path / "benchmark.md").read_text()


def test_in_base_steps_is_the_median_quotient_per_round():
  base = {"samples": [1.0, 2.0, 1.0], "work_units_per_step": 16}
  mge = {"samples": [2.5, 4.4, 2.2], "work_units_per_step": 37}
  (cost,) = benchmark.in_base_steps(base, {"mge": mge}).values()
  # Quotients 2.5, 2.2 and 2.2 per round: the slow second round cancels out.
  assert cost["seconds"] == pytest.approx(2.2)
  assert cost["work_units"] == pytest.approx(37 / 16)


def test_steps_are_timed_in_interleaved_rounds():
  calls = []

  def step(name):
    def run():
      calls.append(name)
      return 0.0
    return run

  times = benchmark._time_interleaved({"a": step("a"), "b": step("b"), "c": step("c")}, 3)
  assert calls == ["a", "b", "c"] * 3
  assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
  assert all(t >= 0 for v in times.values() for t in v)


def test_settle_calls_come_before_each_timed_call(monkeypatch):
  """With settle=1 each round calls a step twice and times only the second call."""
  calls = []
  clock = iter([0.0, 1.0, 5.0, 7.0])   # a's timed call 1 s, b's 2 s
  monkeypatch.setattr("experiments.benchmark.time.perf_counter", lambda: next(clock))
  times = benchmark._time_interleaved({"a": lambda: calls.append("a"),
                                       "b": lambda: calls.append("b")}, 1, settle=1)
  assert calls == ["a", "a", "b", "b"]
  assert times == {"a": [1.0], "b": [2.0]}
  with pytest.raises(ValueError, match="settle must be >= 0"):
    benchmark._time_interleaved({"a": lambda: None}, 1, settle=-1)


def test_torch_runs_before_and_after_are_averaged_per_size():
  before = [{"res": 64, "single_b16": 1.0, "mge4": 2.0, "single_b240": 10.0},
            {"res": 128, "single_b16": 4.0, "mge4": 9.0, "errors": {"single_b240": "killed"}}]
  after = [{"res": 64, "single_b16": 1.2, "mge4": 2.4, "errors": {"single_b240": "killed"}},
           {"res": 128, "single_b16": 5.0, "mge4": 10.0, "errors": {"single_b240": "killed"}}]
  rows = benchmark.bracket_torch_rows(before, after)
  assert [r["res"] for r in rows] == [64, 128]
  assert rows[0]["single_b16"] == pytest.approx(1.1) and rows[0]["mge4"] == pytest.approx(2.2)
  # A step that failed in either run has no mean, only its error.
  assert "single_b240" not in rows[0] and rows[0]["errors"] == {"single_b240": "killed"}
  assert rows[1]["single_b16"] == pytest.approx(4.5) and rows[1]["before"] is before[1]
  with pytest.raises(ValueError):
    benchmark.bracket_torch_rows(before, after[:1])


def test_bfloat16_steps_smoke_and_per_round_ratios(tmp_path):
  out = benchmark.main(["--config", "smoke", "--repeats", "3", "--sections", "steps", "torch",
                        "--mge", "by-mesh", "--compute-dtype", "bfloat16",
                        "--torch-twin", str(tmp_path / "no_twin.py"),
                        "--workdir", str(tmp_path)])
  assert out["config"]["compute_dtype"] == "bfloat16"
  assert "skipped" in out["torch"]   # bracketing a missing twin skips it, steps still run
  (row,) = out["steps"]
  same, mge = row["single_b3"], row["mge2_by_mesh"]
  assert len(same["samples"]) == len(mge["samples"]) == 3
  assert row["speed_ratio_rounds"] == pytest.approx(
      [a / b for a, b in zip(same["samples"], mge["samples"])])
  assert row["speed_ratio"] == pytest.approx(same["seconds_per_step"] / mge["seconds_per_step"])
  assert "compute dtype bfloat16" in (tmp_path / "benchmark.md").read_text()


def test_loss_eval_and_pipeline_smoke(tmp_path):
  out = benchmark.main(["--config", "smoke", "--repeats", "1", "--sections", "loss-eval",
                        "pipeline", "--loss-eval-model", "resnet", "--loss-eval-sizes", "32",
                        "--pipeline-steps", "2", "--workdir", str(tmp_path)])
  (row,) = out["loss_eval"]
  # 24 images at 32^2: batch 16 on 32^2 (evaluated on two meshes) and 8 on 16^2.
  assert row["batch_sizes"] == [16, 8] and row["loss_evaluations"]["mge"] == 40
  assert row["mge_seconds"] > 0 and row["single_seconds"] > 0
  p = out["pipeline"]
  assert min(p["train_loop_steps_per_second"], p["pre_staged_steps_per_second"]) > 0
  text = (tmp_path / "benchmark.md").read_text()
  assert "Loss evaluation" in text and "pre-staged" in text


def test_time_to_mse_first_reach_and_table():
  evals = [{"step": 2, "work_units": 4.0, "mse": 0.3, "train_seconds": 1.0,
            "compile_seconds": 2.0},
           {"step": 4, "work_units": 8.0, "mse": 0.1, "train_seconds": 2.0,
            "compile_seconds": 2.0},
           {"step": 6, "work_units": 12.0, "mse": 0.05, "train_seconds": 3.0,
            "compile_seconds": 2.0}]
  assert benchmark._first_reach(evals, 0.1)["step"] == 4
  assert benchmark._first_reach(evals, 0.01) is None
  ttm = {"target_mse": 0.1, "model": "resnet", "denoise_config": "cpu", "data": "d",
         "split_step": True,
         "single": {"iterations": [8], "final_mse": 0.1, "time_to_target": 40.0,
                    "work_units_to_target": 100.0},
         "full_multiscale": [
             {"scale": 1, "iterations": [4, 2], "final_mse": 0.2, "reached": False,
              "train_seconds": 3.0, "compile_seconds": 1.0},
             {"scale": 2, "iterations": [8, 4], "final_mse": 0.09, "reached": True,
              "time_to_target": 4.0, "work_units_to_target": 30.0, "speedup": 10.0}]}
  table = benchmark.time_to_mse_table(ttm)
  assert "| Full-Multiscale x1 | [4, 2] | 0.2000 | no (4.0 s spent) |" in table
  assert "| Full-Multiscale x2 | [8, 4] | 0.0900 | yes | 4.0 | 30 | 10.00x |" in table
  assert "one program per model pass" in table
  assert "one program per step" in benchmark.time_to_mse_table({**ttm, "split_step": False})


@pytest.mark.parametrize("size,evaluations", [(256, 752), (128, 624), (64, 560), (32, 528),
                                              (16, 512)])
def test_table1_hierarchy_reproduces_the_papers_loss_evaluation_counts(size, evaluations):
  """MGE paper Table 1, 'Number of loss evaluations', MGE row, 512 images."""
  h = benchmark.table1_hierarchy(size, 512)
  assert h.batch_sizes[0] == 16 or h.levels == 1
  assert sum(h.batch_sizes) == 512
  assert 2 * sum(h.batch_sizes[:-1]) + h.batch_sizes[-1] == evaluations


def test_table1_hierarchy_errors():
  with pytest.raises(ValueError, match="power of two"):
    benchmark.table1_hierarchy(48, 512)
  with pytest.raises(ValueError, match="do not cover"):
    benchmark.table1_hierarchy(256, 200)


def test_torch_section_skips_with_a_reason(tmp_path):
  out = benchmark.bench_torch((16,), 1, tmp_path / "missing_twin.py")
  assert "skipped" in out
  assert "skipped" in benchmark.torch_table(out, [])


def test_torch_table_ratios():
  torch_out = {"rows": [{"res": 64, "single_b16": 2.0, "mge4": 4.0, "single_b240": 40.0}]}
  jax_row = {"model": "resnet", "size": 64, "levels": 4, "fastest_mge": "mge4_by_mesh",
             "single_b16": {"seconds_per_step": 1.0},
             "mge4_by_mesh": {"seconds_per_step": 2.0},
             "single_b240": {"seconds_per_step": 30.0}}
  table = benchmark.torch_table(torch_out, [jax_row])
  assert "| 64 | 2 | 4 | 40 | 10.00x | 0.50 | 0.50 | 0.75 |" in table


def test_unknown_section_is_an_error(tmp_path):
  with pytest.raises(SystemExit, match="unknown section"):
    benchmark.main(["--config", "smoke", "--sections", "bogus", "--workdir", str(tmp_path)])


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "63"], "image side 63 is not divisible"),
    (["--sizes", "16", "--levels", "0"], "must be a positive integer"),
    # The UNet halves its input twice: the 3-level hierarchy at 24^2 has a 6^2 mesh.
    (["--models", "resnet", "unet", "--sizes", "24", "--levels", "3"],
     r"unet needs image sides divisible by 4, .* at 24\^2 has meshes 6\^2"),
])
def test_bad_hierarchy_exits_before_anything_compiles(tmp_path, capsys, argv, message):
  """A size the levels cannot halve is refused up front (argparse or the
  hierarchy's own message), and no result file is started."""
  with pytest.raises(SystemExit) as exc:
    benchmark.main(["--config", "smoke", "--sections", "steps", "--workdir", str(tmp_path)]
                   + argv)
  assert re.search(message, str(exc.value) + capsys.readouterr().err)
  assert not (tmp_path / "benchmark.json").exists()


def test_torch_table_keeps_the_steps_of_a_killed_run():
  torch_out = {"rows": [{"res": 128, "single_b16": 8.0, "mge4": 20.0,
                         "errors": {"single_b240": "killed (exit -9; -9 is usually out of "
                                                   "memory)"}}]}
  jax_row = {"model": "resnet", "size": 128, "levels": 4, "fastest_mge": "mge4",
             "single_b16": {"seconds_per_step": 4.0}, "mge4": {"seconds_per_step": 15.0}}
  table = benchmark.torch_table(torch_out, [jax_row])
  assert "| 128 | 8 | 20 | killed (exit -9; -9 is usually out of memory) | n/a | 0.50 | 0.75 | " \
      "n/a |" in table


def test_torch_steps_failure_is_recorded_per_kind(tmp_path):
  pytest.importorskip("torch")
  twin = tmp_path / "broken_twin.py"
  twin.write_text("raise RuntimeError('no model here')\n")
  out = benchmark.bench_torch((8,), 1, twin, same_samples=False)
  (row,) = out["rows"]
  assert set(row["errors"]) == {"single_b16", "mge4"}
  assert "failed" in row["errors"]["mge4"] and "no model here" in row["errors"]["mge4"]


def test_first_step_runs_cold_then_warm_in_fresh_processes(tmp_path):
  out = benchmark.main(["--config", "smoke", "--sections", "first-step", "--mge", "by-mesh",
                        "--workdir", str(tmp_path)])
  (row,) = out["first_step"]
  assert row["model"] == "resnet" and row["mge"] == "by-mesh"
  cache = tmp_path / "first_step_cache" / "resnet"
  for run, step_cache in (("cold", "miss"), ("warm", None), ("warm_step_cache", "hit")):
    phases = row[run]["phases"]
    assert set(phases) == {"imports", "init", "state", "trace_and_lower", "compile",
                           "first_step"}
    assert row[run]["compile_cache"] == str(cache / "xla")
    assert row[run]["step_cache"] == step_cache
    # A step-cache hit traces nothing; every other phase takes time.
    traced = {k: v for k, v in phases.items() if not (step_cache == "hit"
                                                      and k == "trace_and_lower")}
    assert all(v > 0 for v in traced.values())
  assert row["warm_step_cache"]["phases"]["trace_and_lower"] == 0.0
  # The cold run filled both caches the warm runs read.
  assert any((cache / "xla").iterdir())
  # The initialiser, the train state and the step.
  assert len(list((cache / "steps").glob("*.step"))) == 3
  md = (tmp_path / "benchmark.md").read_text()
  assert "| resnet | 16 | by-mesh | warm (XLA cache) |" in md
  assert "| resnet | 16 | by-mesh | warm (XLA + step cache) |" in md
  # Every process started from the same parameters, under the flags this test set.
  assert len({row[run]["params_sha256"] for run in benchmark.FIRST_STEP_RUNS}) == 1
  assert all("xla_backend_optimization_level" in row[run]["xla_flags"]
             for run in benchmark.FIRST_STEP_RUNS)


def test_first_step_cold_run_alone(tmp_path):
  """Also the step as one program per pass (mgtrain.split_step) in a fresh process."""
  out = benchmark.main(["--config", "smoke", "--sections", "first-step", "--mge", "by-mesh",
                        "--split-step",
                        "--first-step-runs", "cold", "--init-platform", "cpu",
                        "--workdir", str(tmp_path)])
  (row,) = out["first_step"]
  assert "cold" in row and "warm" not in row and "warm_step_cache" not in row
  assert row["cold"]["init_platform"] == "cpu" and row["cold"]["split_step"]
  assert row["cold"]["step_cache"] == "miss" and row["cold"]["phases"]["compile"] > 0
  assert row["cold"]["phases"]["trace_and_lower"] > 0
  md = (tmp_path / "benchmark.md").read_text()
  assert "| resnet | 16 | by-mesh split | cold |" in md and "warm" not in md.split("|---")[-1]


def test_first_step_rejects_unknown_runs(tmp_path):
  with pytest.raises(ValueError, match="first-step runs"):
    benchmark.bench_first_step(benchmark.CONFIGS["smoke"], "by-mesh", None, tmp_path,
                               runs=("hot",))
  with pytest.raises(ValueError, match="first-step runs"):
    benchmark.bench_first_step(benchmark.CONFIGS["smoke"], "by-mesh", None, tmp_path, runs=())


def test_same_samples_step_split_into_accumulated_micro_batches(tmp_path):
  out = benchmark.main(["--config", "smoke", "--repeats", "1", "--sections", "steps",
                        "--mge", "by-mesh", "--same-samples-accumulate", "3",
                        "--workdir", str(tmp_path)])
  (row,) = out["steps"]
  same = row["single_b3"]
  # One optimizer step on the same 3 samples, as 3 calls of batch 1.
  assert same["accumulated_in"] == 3 and same["micro_batch_sizes"] == [1]
  assert same["batch_sizes"] == [3]
  assert same["work_units_per_step"] == pytest.approx(row["single_b1"]["work_units_per_step"] * 3)
  assert "memory_ratio" not in row and row["speed_ratio"] > 0
  assert "3 x b1 accumulated" in (tmp_path / "benchmark.md").read_text()


def test_accumulation_only_where_the_whole_batch_would_not_fit():
  gib = 2 ** 30
  assert benchmark.accumulation_for(None, 240, 24 * gib) == 1
  assert benchmark.accumulation_for(16 * gib, 240, 24 * gib) == 1
  k = benchmark.accumulation_for(75 * gib, 240, 24 * gib)
  assert 240 % k == 0 and 75 * gib / k <= 8 * gib and 75 * gib / (k - 1) > 8 * gib


@pytest.mark.parametrize("layer_name", benchmark.BENCH_LAYERS)
def test_layer_problem_loss_is_half_the_squared_output(layer_name):
  import jax
  import numpy as np
  layer, params, x, loss = benchmark.layer_problem(layer_name, 4, 8, 2)
  assert x.shape == (2, 8, 8, 4)
  y = layer.apply(params, x)
  np.testing.assert_allclose(loss(params, x), 0.5 * np.sum(np.square(y)), rtol=1e-5)
  # The layer is linear in x at init (zero bias), so <x, dL/dx> = ||y||^2 = 2 L.
  grad_x = jax.grad(loss, argnums=1)(params, x)
  np.testing.assert_allclose(np.vdot(grad_x, x), 2 * loss(params, x), rtol=1e-4)


def test_layer_problem_rejects_an_unknown_layer():
  with pytest.raises(ValueError, match="layer must be one of"):
    benchmark.layer_problem("conv5x5", 4, 8, 2)


@pytest.mark.parametrize("main,argv", [
    ("first_step", ["--size", "24", "--levels", "4"]),
    ("levers", ["--config", "smoke", "--model", "unet", "--sizes", "24", "--levels", "4"]),
    ("profile_step", ["--config", "smoke", "--model", "unet", "--size", "24", "--levels", "4"]),
    ("levers", ["--config", "smoke", "--sizes", "20", "--levels", "4"]),
])
def test_step_tools_refuse_a_hierarchy_their_model_cannot_take(main, argv, tmp_path):
  """first_step, levers and profile_step check the model against every mesh
  before compiling (the UNet failed inside its trace before)."""
  import importlib   # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"experiments.{main}")
  if main != "first_step":
    argv = [*argv, "--workdir", str(tmp_path)]
  with pytest.raises(SystemExit, match="not divisible|needs image sides divisible by 4"):
    module.main(argv)
