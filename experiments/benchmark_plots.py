"""PNG figures of :mod:`experiments.benchmark` results.

One figure per section found in the results (``BENCH`` below is the
``benchmark.json`` a run writes):

* ``steps``: left, the speed ratio of single-scale on the same samples over
  the MGE step, per model and mesh, as a bar with the per-round spread
  (min-max of ``speed_ratio_rounds``) and the #WU ratio (``wu_ratio``,
  15 / 2.31 = 6.49 for 4 levels) as a black tick: issue 8's CPU target is
  a bar at or above its tick (on a GPU: 4x at 64², 90% of it above). Right, seconds per step of every timed
  step on a log axis.
* ``time_to_mse``: validation MSE against wall seconds (training plus
  compiles, as ``time_to_target`` counts them) for single-scale and each
  Full-Multiscale run, with single-scale's final MSE as the target line.
* ``mfc``: forward+backward time of the mesh-free conv over a 3x3 conv's,
  per channel count and mesh, against XLA's direct conv and (on CPU) the
  Winograd conv, with the per-round range where the run has one; the
  target is at or below 1.
* ``loss_eval``: the MGE paper's Table 1 analogue, speed ratio beside the
  #WU ratio per finest mesh.

Several result files merge into one set of figures, so rows timed one
process per model and size (as ``docs/benchmark_cpu.md`` does) share one
plot; all of them must come from one backend (a CPU and a GPU ratio on
one axis would invite a comparison the runs do not support)::

  python -m experiments.benchmark_plots runs/a/benchmark.json runs/b/benchmark.json \\
      --out docs/benchmark_cpu

writes ``docs/benchmark_cpu_steps.png`` and the other sections' figures.
``python -m experiments.benchmark`` writes its own run's figures next to
its ``benchmark.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SECTIONS = ("steps", "time_to_mse", "mfc", "loss_eval")
MODEL_NAMES = {"resnet": "ResNet", "unet": "UNet", "mfc-resnet": "MFC-ResNet",
               "mfc-pairwise-resnet": "MFC-pairwise-ResNet", "mfc-unet": "MFC-UNet"}


def merge_results(results: list[dict]) -> dict:
  """One results dict from several ``benchmark.json`` dicts of one backend.

  ``steps``, ``mfc`` and ``loss_eval`` rows are concatenated in the given
  order; ``time_to_mse`` is the last one given. Raises ``ValueError`` for
  an empty list or results from different backends.
  """
  if not results:
    raise ValueError("no benchmark results to merge")
  backends = sorted({r.get("backend", "?") for r in results})
  if len(backends) > 1:
    raise ValueError(f"results from several backends ({', '.join(backends)}); "
                     "plot each backend's runs on their own")
  merged: dict = {"backend": backends[0], "device": results[-1].get("device", "?")}
  for key in ("steps", "mfc", "loss_eval"):
    rows = [row for r in results for row in r.get(key) or []]
    if rows:
      merged[key] = rows
  for r in results:
    if r.get("time_to_mse"):
      merged["time_to_mse"] = r["time_to_mse"]
  return merged


def step_keys(row: dict) -> tuple[str, str | None, str | None]:
  """``(base single-scale key, MGE key, same-samples key)`` of a steps row.

  The base step is the single-scale step with the smallest batch, the
  same-samples step the one with the largest (absent when the row has one
  single-scale step), the MGE step the row's ``fastest_mge`` (or its
  first ``mge`` key).
  """
  singles = sorted((k for k in row if k.startswith("single_b")),
                   key=lambda k: int(k[len("single_b"):].split("_")[0]))
  if not singles:
    raise ValueError(f"steps row {row.get('model')} {row.get('size')} has no single-scale step")
  mges = [k for k in row if k.startswith("mge") and isinstance(row[k], dict)]
  mge = row.get("fastest_mge") or (mges[0] if mges else None)
  return singles[0], mge, (singles[-1] if len(singles) > 1 else None)


def _pyplot():
  """matplotlib's pyplot on the file-only Agg backend, imported on first use
  (the benchmark's import stays light)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _finish(fig, ax, xlabel: str | None, ylabel: str, title: str):
  """Labels, title and legend of a one-axes figure; returns ``fig``."""
  if xlabel:
    ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def _round_range(ratio: float, rounds: list[float] | None) -> tuple[float, float]:
  """Error-bar lengths below and above ``ratio`` reaching its per-round
  min and max; zero where it lies outside them (a ratio of medians can),
  or when there are no rounds."""
  rounds = rounds or [ratio]
  return max(ratio - min(rounds), 0.0), max(max(rounds) - ratio, 0.0)


def _label(row: dict) -> str:
  return f"{MODEL_NAMES.get(row['model'], row['model'])} {row['size']}²"


def steps_figure(rows: list[dict], title: str):
  """The ``steps`` figure (module docstring) as a matplotlib ``Figure``;
  the caller saves and closes it. Rows are drawn by mesh, then model;
  axes 0 holds one ratio bar per row that has a ``speed_ratio``."""
  rows = sorted(rows, key=lambda r: (r["size"], r["model"]))
  plt = _pyplot()
  import numpy as np
  from matplotlib.lines import Line2D
  from matplotlib.patches import Patch
  fig, (ax_ratio, ax_time) = plt.subplots(1, 2, figsize=(12, 4.4))
  x = np.arange(len(rows))
  for i, row in enumerate(rows):
    if "speed_ratio" in row:
      low, high = _round_range(row["speed_ratio"], row.get("speed_ratio_rounds"))
      met = row["speed_ratio"] >= row.get("wu_ratio", float("inf"))
      ax_ratio.bar(i, row["speed_ratio"], 0.6, color="tab:green" if met else "tab:orange",
                   yerr=[[low], [high]], capsize=4)
      ax_ratio.annotate(f"{row['speed_ratio']:.2f}x", (i, 0.15), ha="center", fontsize=8,
                        color="white", fontweight="bold")
    else:
      ax_ratio.annotate("no same-\nsamples step", (i, 0.2), ha="center", fontsize=8)
    if "wu_ratio" in row:
      ax_ratio.hlines(row["wu_ratio"], i - 0.4, i + 0.4, colors="black", linewidths=2)
  ax_ratio.set_xticks(x, [_label(r) for r in rows], rotation=30, ha="right")
  ax_ratio.set_ylabel("single-scale on the same samples / MGE step")
  ax_ratio.set_title("speed ratio (error bars: per-round min-max)")
  ax_ratio.legend(handles=[Line2D([], [], color="black", linewidth=2, label="#WU ratio"),
                           Patch(color="tab:green", label="at or above the #WU ratio"),
                           Patch(color="tab:orange", label="below it")],
                  fontsize=8, loc="upper center", ncol=3, framealpha=0.9)
  top = max([max(r.get("speed_ratio_rounds") or [r["speed_ratio"]]) for r in rows
             if "speed_ratio" in r] + [r["wu_ratio"] for r in rows if "wu_ratio" in r] + [1.0])
  ax_ratio.set_ylim(0, 1.25 * top)  # room for the legend above the bars

  names = []
  for row in rows:
    for key in step_keys(row):
      if key and key not in names:
        names.append(key)
  width = 0.8 / len(names)
  for j, name in enumerate(names):
    have = [i for i, row in enumerate(rows) if name in row]
    ax_time.bar([i - 0.4 + (j + 0.5) * width for i in have],
                [rows[i][name]["seconds_per_step"] for i in have], width, label=name)
  ax_time.set_yscale("log")
  ax_time.set_xticks(x, [_label(r) for r in rows], rotation=30, ha="right")
  ax_time.set_ylabel("seconds per step (median)")
  ax_time.set_title("step times")
  ax_time.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def time_to_mse_figure(ttm: dict, title: str):
  """The ``time_to_mse`` figure: one MSE curve per run, wall seconds on x."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.4))
  runs = [("single-scale", ttm["single"])] + [
      (f"Full-Multiscale x{run.get('scale', 1)} iterations "
       f"({'/'.join(str(i) for i in run['iterations'])})", run)
      for run in ttm.get("full_multiscale", [])]
  for name, run in runs:
    evals = run.get("evals") or []
    wall = [e["train_seconds"] + e["compile_seconds"] for e in evals]
    line, = ax.plot(wall, [e["mse"] for e in evals], marker=".", label=name)
    if run.get("time_to_target") is not None:
      speedup = f", {run['speedup']:.1f}x sooner" if run.get("speedup") else ""
      ax.axvline(run["time_to_target"], color=line.get_color(), linestyle=":",
                 label=f"reached at {run['time_to_target']:.1f} s{speedup}")
  ax.axhline(ttm["target_mse"], color="black", linestyle="--",
             label=f"single-scale's final MSE {ttm['target_mse']:.4f}")
  ax.set_xscale("log")
  return _finish(fig, ax, "wall seconds (training + compiles)", "validation MSE", title)


def mfc_figure(rows: list[dict], title: str):
  """The ``mfc`` figure: MFC / conv time per mesh, one line per channel count and conv."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.4))
  for channels in sorted({r["channels"] for r in rows}):
    mine = sorted((r for r in rows if r["channels"] == channels), key=lambda r: r["size"])
    sizes = [r["size"] for r in mine]
    for other, marker, style, name in (("conv", "o", "-", "XLA's 3x3 conv"),
                                       ("winograd", "s", "--", "the Winograd 3x3 conv")):
      key = f"mfc_over_{other}_forward_backward"
      if not all(key in r for r in mine):
        continue
      ratios = [r[key] for r in mine]
      # Per-round ranges where the run timed the layers in interleaved rounds.
      spread = list(zip(*(_round_range(q, r.get(f"{key}_rounds")) for q, r in zip(ratios, mine))))
      ax.errorbar(sizes, ratios, yerr=spread, marker=marker, linestyle=style, capsize=3,
                  label=f"{channels} ch, vs {name}")
  ax.axhline(1.0, color="black", linewidth=1, label="target: at or below 1")
  ax.set_xscale("log", base=2)
  sizes = sorted({r["size"] for r in rows})
  ax.set_xticks(sizes, [f"{s}²" for s in sizes])
  return _finish(fig, ax, "mesh", "MFC / 3x3 conv, forward+backward time", title)


def loss_eval_figure(rows: list[dict], title: str):
  """The ``loss_eval`` figure: speed and #WU ratio bars per finest mesh."""
  plt = _pyplot()
  import numpy as np
  rows = sorted(rows, key=lambda r: r["size"])
  fig, ax = plt.subplots(figsize=(6, 4.4))
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [r["speed_ratio"] for r in rows], 0.4, label="speed ratio (measured)")
  ax.bar(x + 0.2, [r["wu_ratio"] for r in rows], 0.4, label="#WU ratio")
  ax.set_xticks(x, [f"{r['size']}², {r['levels']} level{'s' if r['levels'] > 1 else ''}"
                    for r in rows])
  return _finish(fig, ax, None, "single-scale / MGE loss evaluation", title)


def write_figures(results: dict, prefix: Path) -> list[Path]:
  """Writes ``{prefix}_{section}.png`` for each section in ``results``.

  Returns the paths written, in :data:`SECTIONS` order; none when the
  results hold no plottable section.
  """
  plt = _pyplot()
  prefix = Path(prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  where = f"{results.get('device', '?')} ({results.get('backend', '?')})"
  written = []
  plotters = {
      "steps": (steps_figure, f"MGE step vs single-scale on {where}"),
      "time_to_mse": (time_to_mse_figure, f"time to single-scale's MSE on {where}"),
      "mfc": (mfc_figure, f"mesh-free conv vs 3x3 conv on {where}"),
      "loss_eval": (loss_eval_figure, f"MGE paper Table 1 analogue on {where}"),
  }
  for section in SECTIONS:
    if results.get(section):
      path = Path(f"{prefix}_{section}.png")
      make, title = plotters[section]
      fig = make(results[section], title)
      fig.savefig(path, dpi=120)
      plt.close(fig)
      written.append(path)
  return written


def main(argv=None) -> list[Path]:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.benchmark_plots",
      description="PNG figures of one or more experiments.benchmark results of one backend.")
  parser.add_argument("results", nargs="+", type=Path, help="benchmark.json files")
  parser.add_argument("--out", type=Path, default=None,
                      help="figure path prefix (default: next to the first file, "
                           "'<its folder>/benchmark')")
  args = parser.parse_args(argv)
  loaded = []
  for path in args.results:
    if not path.is_file():
      raise SystemExit(f"no such results file: {path}")
    loaded.append(json.loads(path.read_text()))
  try:
    merged = merge_results(loaded)
  except ValueError as e:
    raise SystemExit(str(e)) from e
  written = write_figures(merged, args.out or args.results[0].parent / "benchmark")
  if not written:
    raise SystemExit(f"nothing to plot: none of {', '.join(SECTIONS)} in "
                     f"{', '.join(str(p) for p in args.results)}")
  for path in written:
    print(path)
  return written


if __name__ == "__main__":
  main()
