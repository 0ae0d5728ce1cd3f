"""A/B of step-time levers in one process: MGE mode x XLA options x chunks x dtype x sequencing.

Each variant compiles the same denoising train step that
``experiments.benchmark`` times (4 levels, batches 16/32/64/128 by default)
with ``Lowered.compile(compiler_options=...)``, so XLA debug options are
switched per program inside one process, then reports the median step time,
lowering and compile seconds (the latter including lowering) and XLA's
working memory. Results go to ``WORKDIR/levers.json`` and a Markdown table
``WORKDIR/levers.md`` (:func:`levers_table`) after every size.

All variants of one size are compiled first and then timed in interleaved
rounds (variant 1, 2, ..., then 1 again), as the benchmark times its steps.
Timed one block after another, whichever variant ran first paid this VM's
warm-up and drift: on 2026-12-03 two block-timed runs of ``--sequential off
on`` at 64² gave off / on 3.62 / 3.57 s and, with the order swapped,
3.45 / 4.15 s. Each row has ``ratio_to_first``: the median over rounds of its
time over the first variant's time in the same round.

The H100 figures in ``docs/benchmark_h100.md`` ("Levers measured") came from
these commands, when levers still timed its variants in blocks::

  python -m experiments.levers --model resnet --sizes 64 128 256 --mge terms by-mesh
  python -m experiments.levers --model resnet --sizes 64 --mge terms \\
      --options '{"xla_gpu_autotune_level": 0}' '{"xla_gpu_enable_command_buffer": ""}'
  python -m experiments.levers --model unet --sizes 64 --mge by-mesh \\
      --options '{}' '{"xla_gpu_autotune_level": 0}'

Usage::

  python -m experiments.levers --config smoke        # seconds, on CPU

``--level-parallel off on`` times the MGE step by term on one device against
the same terms each on its own device group (:mod:`mgtrain.level_parallel`).
It needs a device per level; on CPU, fake devices share the same cores, so
there it checks the plumbing, not a multi-device speed-up::

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.levers \
      --mge terms --level-parallel off on --chunk-pixels 262144
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from experiments import runtime  # noqa: F401  (sets XLA_FLAGS before jax)

import jax
import jax.numpy as jnp
import optax

from experiments.benchmark import BENCH_MODELS, _bench_model, _compile_stage, \
    _time_interleaved, check_model_hierarchy, median_ratio_per_round
from experiments.cli import nonnegative_int, positive_int
from experiments.denoise import COMPUTE_DTYPES, add_conv_algorithm_argument, make_loss_fn, \
    sample_denoise_batch
from mgtrain import full_multiscale as fm
from mgtrain import level_parallel
from mgtrain.hierarchy import Hierarchy
from mgtrain.nn import init_params
from mgtrain.nn.convs import resolve_conv_algorithm
from mgtrain.sampling import on_finest_mesh
from mgtrain.transform import multiscale

# --sampling: each MGE term drawn on its own finest mesh, or all on the finest.
SAMPLING = ("coarse", "fine")


def compile_variant(model_name: str, size: int, levels: int, base_batch: int, mode: str,
                    options: dict, chunk_pixels: int | None = None,
                    single_batch: int | None = None, dtype: str = "float32",
                    sequential: bool = False, conv_algorithm: str = "auto",
                    split_step: bool = False, sampling: str = "coarse",
                    level_parallel_step: bool = False) -> tuple[dict, Callable[[], jax.Array]]:
  """One variant compiled and warmed up by the benchmark's own ``_compile_stage``.

  Returns ``(row, step)``: the variant's settings with its lowering and
  compile seconds and memory plan, and ``step()``, which runs one optimizer
  step and returns its loss. ``dtype`` is the model's compute dtype,
  ``sequential`` runs the model passes one after another
  (:func:`mgtrain.mge.sequence_after`), ``conv_algorithm`` computes the
  standard 3x3 convs (:func:`mgtrain.nn.convs.resolve_conv_algorithm`), and
  ``split_step`` compiles the MGE step as one program per model pass
  (:class:`mgtrain.split_step.SplitStep`). ``sampling="fine"`` draws every
  term's samples on the finest mesh (:func:`mgtrain.sampling.on_finest_mesh`)
  instead of on the term's own finest mesh (``"coarse"``, the default).
  ``level_parallel_step`` runs each MGE term on its own group of
  ``jax.devices()`` (:func:`level_parallel_variant`; ``mode="terms"`` only).
  """
  if sampling not in SAMPLING:
    raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
  if level_parallel_step and (conflicts := level_parallel_conflicts(
      [mode], single_batch, split_step, sequential, options)):
    raise ValueError("a level-parallel step runs the MGE terms (mode 'terms') as separate "
                     f"programs; it cannot take: {', '.join(conflicts)}")
  conv_algorithm = resolve_conv_algorithm(conv_algorithm)
  model = _bench_model(model_name, dtype, conv_algorithm)
  h = Hierarchy(levels=levels, size=size, base_batch=base_batch, restriction="nearest")
  pool = jax.random.uniform(jax.random.key(1), (256, size, size, 3), minval=-1, maxval=1)
  params = init_params(model, jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,)))
  stage = (fm.Stage((0,), (single_batch,), 1) if single_batch
           else fm.multiscale_schedule(h, 1)[0])
  fuse = mode == "by-mesh" and not single_batch
  sample_fn = (sample_denoise_batch if sampling == "coarse"
               else on_finest_mesh(sample_denoise_batch))
  if level_parallel_step:
    info, step = level_parallel_variant(stage, h, make_loss_fn(model), params, pool,
                                        chunk_pixels, sample_fn)
  else:
    info, step = _compile_stage(stage, h, make_loss_fn(model), params, pool, chunk_pixels,
                                fuse, compiler_options=options, sequential=sequential,
                                split_step=split_step and not single_batch, sample_fn=sample_fn)
  return {"model": model_name, "size": size, "mge": mode, "options": options,
          "sampling": sampling, "level_parallel": level_parallel_step,
          "chunk_pixels": chunk_pixels, "single_batch": single_batch,
          "compute_dtype": dtype, "conv_algorithm": conv_algorithm, **info}, step


def level_parallel_conflicts(modes, single_batch, split_step: bool, sequential: bool,
                             options) -> list[str]:
  """What a level-parallel step cannot run with, named as ``levers``' options
  (empty: nothing). It runs the MGE terms (mode ``terms``) as separate
  programs, one per device group, which take no single batch, split step,
  sequential passes or XLA options. ``options``: a dict of XLA options, or
  a list of them (``[{}]``: none).

  >>> level_parallel_conflicts(["terms"], None, False, False, {})
  []
  >>> level_parallel_conflicts(["by-mesh"], None, True, False, [{}])
  ['--mge other than terms', '--split-step on']
  """
  named = {"--mge other than terms": any(m != "terms" for m in modes),
           "--single-batch": bool(single_batch), "--split-step on": split_step,
           "--sequential on": sequential,
           "--options": any(options) if isinstance(options, list) else bool(options)}
  return [name for name, conflict in named.items() if conflict]


def level_parallel_variant(stage: fm.Stage, hierarchy: Hierarchy, loss_fn, params, pool,
                           chunk_pixels: int | None, sample_fn) -> tuple[dict, Callable]:
  """``stage``'s MGE step with each term on its own group of ``jax.devices()``
  (:mod:`mgtrain.level_parallel`), warmed up: ``(info, step)`` as from
  :func:`experiments.benchmark._compile_stage`, with the same optimizer.

  The term programs compile on the first call, so ``compile_seconds`` is that
  call's wall time (tracing, lowering and compiling every group's programs, and
  one step); there is no separate lowering time and no single memory plan
  (``lower_seconds``, ``temp_bytes`` and ``peak_bytes`` are ``None``).
  ``device_groups`` gives each group's device count. Needs at least one device
  per level: on CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.
  """
  tx = multiscale(optax.adam(1e-4), len(stage.levels))
  groups = level_parallel.device_groups(stage, jax.devices())
  lp = level_parallel.make_level_parallel_step(stage, hierarchy, loss_fn, sample_fn, tx, groups,
                                               chunk_pixels)
  holder = {}
  holder["state"], data = lp.place(fm.fresh_state(params, seed=0, tx=tx), pool)

  def one():
    holder["state"], metrics = lp(holder["state"], data)
    return metrics["loss"]

  t0 = time.perf_counter()
  jax.block_until_ready(one())
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(one())   # a warm-up call, as the other variants have
  return {"levels": list(stage.levels), "batch_sizes": list(stage.batch_sizes),
          "work_units_per_step": float(stage.work_units_per_step), "fuse_meshes": False,
          "split_step": False, "sequential": False, "device_groups": [len(g) for g in groups],
          "lower_seconds": None, "compile_seconds": compile_s,
          "temp_bytes": None, "peak_bytes": None}, one


def time_interleaved(rows: list[dict], steps: list[Callable[[], jax.Array]],
                     repeats: int, settle: int = 0) -> list[dict]:
  """Times ``steps`` in ``repeats`` interleaved rounds; adds to each row its
  ``seconds_per_step`` (median), ``samples`` and ``ratio_to_first``.

  ``ratio_to_first`` is the median over rounds of the step's time over
  ``steps[0]``'s time in the same round, so a drift of the machine's speed
  during the run cancels out of it.
  """
  times = _time_interleaved(dict(enumerate(steps)), repeats, settle)
  for i, row in enumerate(rows):
    row.update(seconds_per_step=statistics.median(times[i]), samples=times[i],
               ratio_to_first=median_ratio_per_round(times[i], times[0]))
  return rows


def levers_table(rows: list[dict]) -> str:
  """One Markdown row per variant: settings, step time, ratio to the size's
  first variant, compile seconds and working memory (or the compile error)."""
  lines = ["| model | res | mode | compute | sequential | conv | chunk | XLA options | ms / step "
           "| ratio to first | compile s | working memory MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mode = f"single b{r['single_batch']}" if r.get("single_batch") else (
        r["mge"] + (" split" if r.get("split_step") else "")
        + (" fine sampling" if r.get("sampling") == "fine" else "")
        + (" level-parallel ({})".format("/".join(map(str, r["device_groups"])))
           if r.get("level_parallel") else ""))
    settings = (f"| {r['model']} | {r['size']} | {mode} | {r['compute_dtype']} "
                f"| {'on' if r['sequential'] else 'off'} | {r.get('conv_algorithm', 'direct')} "
                f"| {r.get('chunk_pixels') or 0} "
                f"| `{json.dumps(r['options'])}` ")
    if "error" in r:
      lines.append(settings + f"| error: {r['error']} | | | |")
    elif "seconds_per_step" not in r:
      lines.append(settings + "| not timed | | | |")
    else:
      memory = "-" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.0f}"
      lines.append(settings + f"| {r['seconds_per_step'] * 1e3:.2f} | {r['ratio_to_first']:.3f}x "
                   f"| {r['compile_seconds']:.1f} | {memory} |")
  return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
  """The command line of ``python -m experiments.levers``, checked before anything compiles.

  ``--sizes``, ``--levels`` and ``--base-batch`` come back resolved from
  ``--config`` when not given. Exits with a message on a bad command line.
  """
  p = argparse.ArgumentParser(prog="python -m experiments.levers", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", choices=("default", "smoke"), default="default",
                 help="smoke: ResNet at 16^2, 2 levels, batch 1 (seconds)")
  p.add_argument("--model", choices=BENCH_MODELS, default="resnet")
  p.add_argument("--sizes", nargs="+", type=positive_int, default=None)
  p.add_argument("--levels", type=positive_int, default=None)
  p.add_argument("--base-batch", type=positive_int, default=None)
  p.add_argument("--mge", nargs="+", choices=("terms", "by-mesh"), default=["terms", "by-mesh"])
  p.add_argument("--options", nargs="+", type=json.loads, default=[{}],
                 help="XLA compile options per variant, as JSON objects")
  p.add_argument("--chunk-pixels", nargs="+", type=nonnegative_int, default=[0],
                 help="per-batch chunk sizes (samples x pixels) to try; 0 = no chunking")
  p.add_argument("--compute-dtype", nargs="+", choices=sorted(COMPUTE_DTYPES),
                 default=["float32"],
                 help="model compute dtypes to try (bfloat16: float32 params and Adam)")
  p.add_argument("--sequential", nargs="+", choices=("off", "on"), default=["off"],
                 help="model passes side by side (off) and/or one after another (on)")
  p.add_argument("--split-step", nargs="+", choices=("off", "on"), default=["off"],
                 help="the MGE step as one program (off) and/or one program per model "
                      "pass (on; mgtrain.split_step)")
  p.add_argument("--sampling", nargs="+", choices=SAMPLING, default=["coarse"],
                 help="draw each MGE term's samples on its finest mesh (coarse, the "
                      "default) and/or all on the finest mesh (fine; mgtrain.sampling)")
  p.add_argument("--level-parallel", nargs="+", choices=("off", "on"), default=["off"],
                 help="the MGE terms on one device (off) and/or each on its own device group, "
                      "concurrently (on; mgtrain.level_parallel; needs --mge terms and at least "
                      "one device per level)")
  add_conv_algorithm_argument(p, nargs="+")
  p.add_argument("--single-batch", type=nonnegative_int, default=0,
                 help="time a single-scale step of this batch instead of MGE")
  p.add_argument("--repeats", type=positive_int, default=20)
  p.add_argument("--settle", type=nonnegative_int, default=1,
                 help="untimed calls before each timed call (see experiments.benchmark "
                      "--settle; default 1 since 2026-12-05, 0 before)")
  p.add_argument("--workdir", default="runs/levers")
  args = p.parse_args(argv)
  smoke = args.config == "smoke"
  args.sizes = args.sizes or ([16] if smoke else [64])
  args.levels = levels = args.levels or (2 if smoke else 4)
  args.base_batch = args.base_batch or (1 if smoke else 16)
  for size in args.sizes:
    check_model_hierarchy("--model / --sizes / --levels / --base-batch", [args.model], levels,
                          size, args.base_batch)
  if "on" in args.level_parallel:
    conflicts = level_parallel_conflicts(args.mge, args.single_batch, "on" in args.split_step,
                                         "on" in args.sequential, args.options)
    if conflicts:
      p.error("--level-parallel on runs the MGE terms as separate programs: it needs --mge "
              "terms, and no --single-batch, --split-step on, --sequential on or --options "
              f"(given: {', '.join(conflicts)})")
    if len(jax.devices()) < levels:
      p.error(f"--level-parallel on needs at least one device per level ({levels}); found "
              f"{len(jax.devices())}. On CPU, run with "
              f"XLA_FLAGS=--xla_force_host_platform_device_count={levels} (or more)")
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  sizes, levels, base_batch = args.sizes, args.levels, args.base_batch
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = []
  for size in sizes:
    timed_rows, steps = [], []
    for mode in (["single"] if args.single_batch else args.mge):
      for options, chunk, dtype, seq, algo, split, sampling, lp in itertools.product(
          args.options, args.chunk_pixels, args.compute_dtype, args.sequential,
          args.conv_algorithm, args.split_step, args.sampling, args.level_parallel):
        label = (f"{args.model} {size}^2 {mode} chunk {chunk} {dtype} sequential {seq} "
                 f"conv {algo} split {split} sampling {sampling} level-parallel {lp} "
                 f"{json.dumps(options)}")
        try:
          row, step = compile_variant(args.model, size, levels, base_batch, mode, options,
                                      chunk or None, args.single_batch or None, dtype,
                                      sequential=seq == "on", conv_algorithm=algo,
                                      split_step=split == "on", sampling=sampling,
                                      level_parallel_step=lp == "on")
        except jax.errors.JaxRuntimeError as e:  # an option this XLA does not know
          row = {"model": args.model, "size": size, "mge": mode, "options": options,
                 "compute_dtype": dtype, "sequential": seq == "on", "conv_algorithm": algo,
                 "split_step": split == "on", "sampling": sampling,
                 "error": str(e).splitlines()[0]}
          print(f"{label}: {row['error']}", flush=True)
        else:
          timed_rows.append(row)
          steps.append(step)
          lowered = ("" if row["lower_seconds"] is None
                     else f"lower {row['lower_seconds']:.1f} s, ")
          print(f"{label}: compiled ({lowered}compile {row['compile_seconds']:.1f} s, "
                f"working memory {row['temp_bytes']} B)", flush=True)
        row["label"] = label
        rows.append(row)
    if steps:
      print(f"timing {len(steps)} variant(s) at {size}^2 in {args.repeats} interleaved "
            "round(s) ...", flush=True)
      time_interleaved(timed_rows, steps, args.repeats, args.settle)
      for row in timed_rows:
        print(f"{row['label']}: {row['seconds_per_step'] * 1e3:.2f} ms/step, "
              f"{row['ratio_to_first']:.3f}x the first variant", flush=True)
    (workdir / "levers.json").write_text(json.dumps(rows, indent=1))
    (workdir / "levers.md").write_text(levers_table(rows))
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
