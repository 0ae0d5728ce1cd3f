"""experiments.benchmark_plots: merged results, the drawn values, files and errors."""

import json

import matplotlib
import pytest

from experiments import benchmark_plots as bp

matplotlib.use("Agg")


def _step(seconds, batch):
  return {"seconds_per_step": seconds, "batch_sizes": [batch]}


def _row(model, size, ratio=None, rounds=None, wu=6.486):
  row = {"model": model, "size": size, "levels": 4, "single_b16": _step(1.0, 16),
         "mge4_by_mesh": _step(2.5, 16), "fastest_mge": "mge4_by_mesh"}
  if ratio is not None:
    row.update(single_b240=_step(2.5 * ratio, 240), speed_ratio=ratio,
               speed_ratio_rounds=rounds or [ratio], wu_ratio=wu)
  return row


def _results(backend="cpu", **sections):
  return {"backend": backend, "device": f"{backend}:0", **sections}


def _ttm(reached):
  evals = [{"step": 10 * i, "mse": 0.2 / i, "train_seconds": 5.0 * i, "compile_seconds": 2.0}
           for i in range(1, 5)]
  fm = {"iterations": [40, 20], "scale": 2, "evals": evals, "reached": reached}
  if reached:
    fm.update(time_to_target=17.0, speedup=12.5)
  return {"target_mse": 0.07, "single": {"iterations": [40], "evals": evals,
                                         "time_to_target": 22.0},
          "full_multiscale": [fm]}


def test_merge_concatenates_rows_and_keeps_the_last_time_to_mse():
  a = _results(steps=[_row("resnet", 64, 6.6)], mfc=[{"channels": 128, "size": 128}],
               time_to_mse=_ttm(False))
  b = _results(steps=[_row("unet", 128, 6.1)], time_to_mse=_ttm(True))
  merged = bp.merge_results([a, b])
  assert [(r["model"], r["size"]) for r in merged["steps"]] == [("resnet", 64), ("unet", 128)]
  assert len(merged["mfc"]) == 1 and "loss_eval" not in merged
  assert merged["time_to_mse"]["full_multiscale"][0]["reached"] is True
  assert merged["backend"] == "cpu"


def test_merge_refuses_mixed_backends_and_nothing():
  with pytest.raises(ValueError, match="several backends"):
    bp.merge_results([_results("cpu"), _results("gpu")])
  with pytest.raises(ValueError, match="no benchmark results"):
    bp.merge_results([])


def test_step_keys_picks_base_mge_and_same_samples_steps():
  assert bp.step_keys(_row("resnet", 64, 6.6)) == ("single_b16", "mge4_by_mesh", "single_b240")
  # A GPU UNet row whose same-samples step was skipped.
  assert bp.step_keys(_row("unet", 64)) == ("single_b16", "mge4_by_mesh", None)
  with pytest.raises(ValueError, match="no single-scale step"):
    bp.step_keys({"model": "resnet", "size": 64, "mge4": _step(1.0, 16)})


def test_steps_figure_draws_each_ratio_coloured_by_the_wu_ratio():
  rows = [_row("resnet", 64, 6.9, [6.2, 7.3]), _row("resnet", 128, 5.9, [5.7, 6.9]),
          _row("unet", 64)]
  fig = bp.steps_figure(rows, "t")
  ax_ratio = fig.axes[0]
  bars = [p for p in ax_ratio.patches if p.get_height() > 0]
  assert [round(b.get_height(), 6) for b in bars] == [6.9, 5.9]
  green, orange = (matplotlib.colors.to_rgba(c) for c in ("tab:green", "tab:orange"))
  assert [b.get_facecolor() for b in bars] == [green, orange]
  # The row without a same-samples step is labelled, not drawn as a zero bar.
  assert any("no same" in t.get_text() for t in ax_ratio.texts)
  # Step times: b16 and MGE for all three rows, b240 for the two that have it.
  times = sorted(round(p.get_height(), 6) for p in fig.axes[1].patches)
  assert times == sorted([1.0] * 3 + [2.5] * 3 + [2.5 * 6.9, 2.5 * 5.9])


def test_time_to_mse_figure_marks_the_target_and_the_hit():
  fig = bp.time_to_mse_figure(_ttm(True), "t")
  (ax,) = fig.axes
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert "single-scale's final MSE 0.0700" in labels
  assert "reached at 17.0 s, 12.5x sooner" in labels
  # Wall time on x is training plus compiles.
  curve = ax.lines[0]
  assert list(curve.get_xdata()) == [7.0, 12.0, 17.0, 22.0]
  unreached = bp.time_to_mse_figure(_ttm(False), "t")
  assert not any("sooner" in t.get_text() for t in unreached.axes[0].get_legend().get_texts())


def test_write_figures_writes_one_png_per_section_present(tmp_path):
  results = _results(
      steps=[_row("resnet", 64, 6.6)], time_to_mse=_ttm(True),
      mfc=[{"channels": 128, "size": s, "mfc_over_conv_forward_backward": 0.5,
            "mfc_over_winograd_forward_backward": 1.1} for s in (128, 256)],
      loss_eval=[{"size": 64, "levels": 3, "speed_ratio": 10.8, "wu_ratio": 8.68}])
  written = bp.write_figures(results, tmp_path / "figs" / "run")
  assert [p.name for p in written] == ["run_steps.png", "run_time_to_mse.png",
                                      "run_mfc.png", "run_loss_eval.png"]
  for path in written:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert bp.write_figures(_results(), tmp_path / "none") == []


def test_cli_merges_files_and_reports_bad_input(tmp_path, capsys):
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text(json.dumps(_results(steps=[_row("resnet", 64, 6.6)])))
  b.write_text(json.dumps(_results(steps=[_row("unet", 64, 7.2)])))
  (path,) = bp.main([str(a), str(b), "--out", str(tmp_path / "both")])
  assert path.name == "both_steps.png" and str(path) in capsys.readouterr().out
  with pytest.raises(SystemExit, match="no such results file"):
    bp.main([str(tmp_path / "missing.json")])
  empty = tmp_path / "empty.json"
  empty.write_text(json.dumps(_results()))
  with pytest.raises(SystemExit, match="nothing to plot"):
    bp.main([str(empty)])
  gpu = tmp_path / "gpu.json"
  gpu.write_text(json.dumps(_results("gpu", steps=[_row("resnet", 64, 3.5)])))
  with pytest.raises(SystemExit, match="several backends"):
    bp.main([str(a), str(gpu)])


def test_mfc_figure_draws_each_ratio_with_its_round_range():
  rows = [{"channels": 128, "size": s, "mfc_over_conv_forward_backward": r,
           "mfc_over_conv_forward_backward_rounds": [r - 0.1, r, r + 0.2]}
          for s, r in ((256, 0.6), (128, 0.5))]
  fig = bp.mfc_figure(rows, "t")
  (container,) = fig.axes[0].containers   # no Winograd ratios: one line
  data_line, _, (bars,) = container.lines
  assert list(data_line.get_xdata()) == [128, 256]
  assert list(data_line.get_ydata()) == [0.5, 0.6]
  ranges = sorted(tuple(round(float(y), 6) for y in seg[:, 1]) for seg in bars.get_segments())
  assert ranges == [(0.4, 0.7), (0.5, 0.8)]


def test_error_bars_stay_non_negative_when_the_ratio_lies_outside_its_rounds():
  # A ratio of medians can fall outside the per-round ratios.
  assert bp._round_range(1.0, [1.1, 1.3]) == (0.0, pytest.approx(0.3))
  assert bp._round_range(2.0, None) == (0.0, 0.0)
  rows = [{"channels": 32, "size": 64, "mfc_over_conv_forward_backward": 0.9,
           "mfc_over_conv_forward_backward_rounds": [1.0, 1.2]}]
  bp.mfc_figure(rows, "t")   # a negative error bar would raise here
