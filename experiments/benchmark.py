"""Step-time benchmarks: single-scale vs MGE steps, and mesh-free vs 3x3 convs.

Every comparison is timed in this one process, after a warm-up call, as the
median of ``--repeats`` timed calls; compile time (lower + compile of the
jitted step) is reported separately. Results go to ``WORKDIR/benchmark.json``
and ``WORKDIR/benchmark.md``, with a PNG figure per section
(``WORKDIR/benchmark_steps.png`` etc., :mod:`experiments.benchmark_plots`).

Sections (``--sections``):

* ``steps`` (issue 8, item 1a): seconds per Adam step of the denoising
  training step (on-device patch sampling, degradation, hierarchy, MGE, the
  :func:`mgtrain.transform.multiscale` update, #WU counter: the step
  :func:`mgtrain.full_multiscale.make_stage_step` builds) for

  - ``single_b{N0}``: single-scale, batch ``N0`` on the fine mesh;
  - ``mge{L}``: an ``L``-level MGE step, batches ``N_j = 2^j N0``, one
    pass per term (:func:`mgtrain.mge.mge_value_and_grad`);
  - ``mge{L}_by_mesh``: the same estimate with one pass per mesh
    (:func:`mgtrain.mge.mge_value_and_grad_by_mesh`; ``--mge`` picks);
  - with ``--split-step``, each MGE step as one program per model pass
    (:class:`mgtrain.split_step.SplitStep`; keys ending ``_split``), and with
    ``--split-single`` the single-scale steps too (same keys; a chunked
    batch is then one chunk program called per chunk);
  - ``single_b{sum N_j}``: single-scale on the same number of samples.

  Models: ``resnet``, ``mfc-resnet``, ``mfc-pairwise-resnet``, ``unet`` and
  ``mfc-unet`` (the UNet in eval mode, dropout off). The ratio
  ``single_b{sum}/mge`` sits next to the #WU ratio
  (6.49x for 4 levels). Memory is each compiled step's own plan from XLA's
  ``memory_analysis()`` (working and peak bytes), on every backend.
* ``mfc`` (item 1c): a mesh-free conv (1x1 map + heat filter, per channel)
  vs a 3x3 conv with the same channels, forward and forward+backward.
* ``torch`` (item 1b): ``../shared/bench/torch_twin.py`` (the ResNet in
  PyTorch, 4 levels, batches 16/32/64/128) run at the same sizes in a
  subprocess of the same run, and the JAX / PyTorch step-time ratios. Skipped,
  with the reason in the output, when torch or the twin is missing.
* ``time-to-mse`` (item 1d, not in the default sections: it trains):
  Full-Multiscale vs single-scale on the denoising config (``cpu`` here,
  ``paper`` for ``--config gpu``): wall time to reach single-scale's final
  validation MSE; see :func:`bench_time_to_mse`.
* ``loss-eval`` (item 1e, not in the default sections): the MGE paper's
  Table 1, loss-evaluation wall time of single-scale vs the telescoping sum
  over 512 images, finest mesh 256^2..16^2 (``--config gpu``; 64^2..16^2 on
  ``cpu``); see :func:`bench_loss_eval`.

* ``pipeline`` (item 1f, not in the default sections): steps/s of a real
  training loop on photographs vs the same step on pre-staged batches; see
  :func:`bench_pipeline`.
* ``first-step`` (compile time, not in the default sections): a fresh
  process's time to its first UNet MGE step at 64^2: with empty caches, with
  a warm persistent compilation cache, and with mgtrain's step cache as
  well; see :func:`bench_first_step`.

Usage::

  python -m experiments.benchmark                       # defaults for the backend found
  python -m experiments.benchmark --sizes 64 128 --levels 4 --repeats 5
  python -m experiments.benchmark --config smoke        # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

from experiments import runtime  # noqa: F401  (sets XLA_FLAGS before jax)

import jax
import jax.numpy as jnp
import optax

from experiments import benchmark_plots, timing
from experiments.cli import existing_folder, nonnegative_int, positive_int
from experiments.configs import CONFIGS as DENOISE_CONFIGS
from experiments.denoise import AUTO_CHOICES, COMPUTE_DTYPES, CPU_CHUNK_RULE, MODEL_CONVS, \
    build_model, add_conv_algorithm_argument, add_sequential_argument, compute_dtype, \
    make_loss_fn, model_conv, resolve_chunk_pixels, resolve_sequential, resolve_split_step, \
    sample_denoise_batch
from experiments.host_speed import describe as describe_host_speed, host_speed
from mgtrain import full_multiscale as fm
from mgtrain import workunits as wu
from mgtrain.hierarchy import CoarseMeshWarning, Hierarchy, HierarchyError
from mgtrain.mge import chunk_cap, chunk_size, level_views
from mgtrain.nn import init_params
from mgtrain.nn.convs import get_conv, resolve_conv_algorithm, standard_conv
from mgtrain.nn.meshfree import MeshFreeConv
from mgtrain.nn.unet import UNet
from mgtrain.split_step import SplitStep
from mgtrain.transform import multiscale

SECTIONS = ("steps", "mfc", "torch", "time-to-mse", "loss-eval", "pipeline", "first-step")
DEFAULT_SECTIONS = ("steps", "mfc", "torch")
# ../shared/bench/torch_twin.py beside the checkout (DEVELOPERS.md).
DEFAULT_TORCH_TWIN = Path(__file__).resolve().parents[2] / "shared" / "bench" / "torch_twin.py"
# The UNet is timed in eval mode: dropout off (the reference trains with 0.5,
# which adds one mask draw and multiply per block).
BENCH_MODELS = tuple(MODEL_CONVS) + ("unet", "mfc-unet")


def _bench_model(name: str, dtype: str = "float32", conv_algorithm: str = "auto"):
  """The model ``name`` of ``BENCH_MODELS`` with compute ``dtype`` (float32 params)
  and its standard convs computed by ``conv_algorithm``."""
  if name == "unet":
    return UNet(conv=model_conv("standard", conv_algorithm), dtype=compute_dtype(dtype))
  if name == "mfc-unet":
    return UNet(conv=get_conv("mfc"), dtype=compute_dtype(dtype))
  return build_model(name, dtype, conv_algorithm)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  name: str
  sizes: tuple[int, ...]
  levels: int
  base_batch: int
  models: tuple[str, ...]
  repeats: int
  mfc_sizes: tuple[int, ...]
  mfc_channels: tuple[int, ...]
  mfc_batch: int
  denoise_config: str = "cpu"    # for time-to-mse
  loss_eval_sizes: tuple[int, ...] = (64, 32, 16)   # finest meshes of loss-eval
  loss_eval_images: int = 512
  # first-step: the compile-time target is the UNet's MGE step at 64^2.
  first_step_models: tuple[str, ...] = ("unet",)
  first_step_size: int = 64
  # The models' compute dtype for steps and loss-eval ('bfloat16': float32
  # params, Adam and loss; see experiments.denoise.COMPUTE_DTYPES).
  compute_dtype: str = "float32"
  # How the standard 3x3 convs are computed (mgtrain.nn.convs; 'auto' is
  # resolved to 'winograd' on CPU, 'direct' elsewhere, before the run).
  conv_algorithm: str = "auto"


CONFIGS = {
    # The reference points: 4 levels, batches 16/32/64/128.
    "gpu": BenchConfig("gpu", (64, 128, 256), 4, 16, ("resnet", "unet"), 20,
                       (64, 128, 256), (32, 128), 16, "paper", (256, 128, 64, 32, 16)),
    # A 64^2 single b240 step takes about a minute on 2 CPU cores.
    "cpu": BenchConfig("cpu", (64,), 4, 16, ("resnet",), 3, (64, 128, 256), (32, 128), 16),
    "smoke": BenchConfig("smoke", (16,), 2, 1, ("resnet",), 2, (16,), (8,), 2, "smoke",
                         (32, 16), 24, ("resnet",), 16),
}


def _memory(compiled) -> dict:
  """The compiled step's own memory plan, from XLA's buffer assignment.

  ``temp_bytes`` is the working memory the step allocates beyond its inputs and
  outputs (activations, gradients, scratch): what grows with the batch.
  ``peak_bytes`` is XLA's peak for the whole program, inputs (the image pool,
  the train state) included. Unlike ``memory_stats()['peak_bytes_in_use']``,
  which is a process-wide high-water mark, both are per program and exist on
  CPU too.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return {"temp_bytes": None, "peak_bytes": None}
  peak = getattr(stats, "peak_memory_in_bytes", 0) or (
      stats.argument_size_in_bytes + stats.output_size_in_bytes
      - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  return {"temp_bytes": int(stats.temp_size_in_bytes), "peak_bytes": int(peak)}


def stage_program(stage: fm.Stage, hierarchy: Hierarchy, loss_fn, params,
                  chunk_pixels: int | None, fuse_meshes: bool = False, accumulate: int = 1,
                  step_cache=None, cache_key: str = "", sequential: bool = False,
                  split_step: bool = False, sample_fn=sample_denoise_batch):
  """The jitted denoising train step of ``stage`` (Adam 1e-4 under
  :func:`mgtrain.transform.multiscale`) and a fresh state for it.

  ``sample_fn`` draws the samples (default: the denoising sampler, which
  draws each MGE term on its finest mesh; ``mgtrain.sampling.on_finest_mesh``
  of it draws everything on the finest mesh, for an A/B).

  With ``split_step`` the step is a :class:`mgtrain.split_step.SplitStep`
  (one program per model pass) instead.

  The step donates its state, which holds copies of ``params``
  (:func:`mgtrain.full_multiscale.fresh_state`). With ``accumulate=k`` the
  inner optimizer is ``optax.MultiSteps(adam, k)``: ``k`` calls accumulate
  their gradients and the ``k``-th applies one Adam update, i.e. one step on
  ``k`` times the stage's samples. ``step_cache`` (with ``cache_key``
  naming the model) builds the state through a
  :class:`mgtrain.step_cache.StepCache`. ``sequential``: the step's model
  passes one after another (:func:`mgtrain.full_multiscale.make_stage_step`).
  """
  inner = optax.adam(1e-4)
  if accumulate > 1:
    inner = optax.MultiSteps(inner, every_k_schedule=accumulate).gradient_transformation()
  tx = multiscale(inner, len(stage.levels), level_terms=not fuse_meshes)
  state = fm.fresh_state(params, seed=0, tx=tx, step_cache=step_cache,
                         cache_key=(f"experiments.benchmark adam 1e-4 {cache_key} levels="
                                    f"{len(stage.levels)} fuse={fuse_meshes} accumulate={accumulate}"))
  if split_step:
    return SplitStep(stage, hierarchy, loss_fn, sample_fn, tx, chunk_pixels,
                     sequential, fuse_meshes), state
  step = fm.make_stage_step(stage, hierarchy, loss_fn, sample_fn, tx,
                            max_pixels_per_chunk=chunk_pixels, fuse_meshes=fuse_meshes,
                            sequential=sequential)
  return jax.jit(step, donate_argnums=0), state


def _compile_stage(stage: fm.Stage, hierarchy: Hierarchy, loss_fn, params, pool,
                   chunk_pixels: int | None, fuse_meshes: bool = False,
                   compiler_options: dict | None = None, accumulate: int = 1,
                   sequential: bool = False, split_step: bool = False,
                   sample_fn=sample_denoise_batch):
  """``stage``'s train step compiled and warmed up: ``(info, step)``.

  ``step()`` runs one optimizer step (``accumulate`` calls) and returns its
  loss, to block on. ``info`` has the compile figures and memory plan;
  ``compile_seconds`` is lowering plus compilation (``lower_seconds`` is the
  first part); ``compiler_options`` are XLA options for this program only.
  With ``accumulate=k`` one step is ``k`` calls of the stage's program with
  gradient accumulation (:func:`stage_program`): a step on ``k`` times the
  stage's batch whose working memory is that of one call. With
  ``split_step`` the step is one program per model pass; its memory figures are
  then those of its largest program, which runs alone. ``sample_fn``: see
  :func:`stage_program`.
  """
  jitted, state = stage_program(stage, hierarchy, loss_fn, params, chunk_pixels, fuse_meshes,
                                accumulate, sequential=sequential, split_step=split_step,
                                sample_fn=sample_fn)
  if split_step:
    compiled = jitted.compile(state, pool, compiler_options=compiler_options)
    lower_s = compiled.lower_seconds
    compile_s = lower_s + compiled.compile_seconds
    plans = [_memory(c) for c in compiled.programs.values()]
    memory = {k: max((m[k] for m in plans if m[k] is not None), default=None)
              for k in ("temp_bytes", "peak_bytes")}
    memory["pass_chunk_calls"] = list(compiled.chunks)   # per pass, calls per step
  else:
    t0 = time.perf_counter()
    lowered = jitted.lower(state, pool)
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile(compiler_options=compiler_options or None)
    compile_s = time.perf_counter() - t0
    memory = _memory(compiled)
  holder = {"state": compiled(state, pool)[0]}   # warm-up

  def one():
    for _ in range(accumulate):
      holder["state"], metrics = compiled(holder["state"], pool)
    return metrics["loss"]

  # Block on the warm-up: dispatch is asynchronous, and an unfinished warm-up
  # would be counted in the first timed call.
  jax.block_until_ready(one())
  info = {"levels": list(stage.levels),
          "batch_sizes": [n * accumulate for n in stage.batch_sizes],
          "work_units_per_step": float(stage.work_units_per_step) * accumulate,
          "fuse_meshes": fuse_meshes, "split_step": split_step, "sequential": sequential,
          "lower_seconds": lower_s, "compile_seconds": compile_s, **memory}
  if accumulate > 1:
    info.update(accumulated_in=accumulate, micro_batch_sizes=list(stage.batch_sizes))
  return info, one


def _time_stage(stage: fm.Stage, hierarchy: Hierarchy, loss_fn, params, pool,
                repeats: int, chunk_pixels: int | None, fuse_meshes: bool = False,
                compiler_options: dict | None = None, accumulate: int = 1,
                sequential: bool = False) -> dict:
  """Median seconds per step of ``stage``'s train step, after an awaited
  warm-up, with :func:`_compile_stage`'s figures."""
  info, one = _compile_stage(stage, hierarchy, loss_fn, params, pool, chunk_pixels,
                             fuse_meshes, compiler_options, accumulate, sequential)
  median, times = timing.median_seconds(one, repeats)
  return {**info, "seconds_per_step": median, "samples": times}


def _time_interleaved(steps: dict, repeats: int, settle: int = 0) -> dict[str, list[float]]:
  """Seconds of each of ``steps`` (name -> callable), timed in ``repeats``
  rounds that each call every step once, in order.

  A slow drift of the machine's speed (other tenants, thermal or frequency
  changes) then falls on all steps alike instead of on whichever was timed
  last, and round ``r``'s times form a pair for a per-round ratio.

  ``settle`` untimed calls precede each timed one, as in a training loop,
  which calls one step over and over. On the 2-core CPU VM one run each
  suggested that a big program's first call after another program is slower
  (2026-12-05, the UNet at 64^2: single b240 15.5 s interleaved against
  12.7 s alone); a later probe, four processes timing blocks and
  interleaved rounds, found no consistent direction (docs/benchmark_cpu.md).
  """
  if settle < 0:
    raise ValueError(f"settle must be >= 0, got {settle}")
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      for _ in range(settle):
        jax.block_until_ready(step())
      times[name].append(timing.seconds(step))
  return times


def memory_budget_bytes() -> int:
  """Memory one step may plan: the device's limit where the backend reports
  one (GPUs), else the host's physical memory (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def accumulation_for(estimated_bytes: int | None, total: int, budget: int) -> int:
  """Micro-batches ``k`` (a divisor of ``total``) so one call of a ``total``
  batch split ``k`` ways plans at most a third of ``budget``; 1 when the
  whole batch plans at most two thirds of it (or nothing is known).

  >>> accumulation_for(75 * 2**30, 240, 24 * 2**30), accumulation_for(16 * 2**30, 240, 24 * 2**30)
  (10, 1)
  """
  if not estimated_bytes or estimated_bytes <= 2 * budget / 3:
    return 1
  return min(k for k in range(2, total + 1)
             if total % k == 0 and estimated_bytes / k <= budget / 3)


def bench_steps(config: BenchConfig, chunk_pixels: int | None | Callable[[int], int | None],
                mge_modes=("terms",),
                progress=print, on_row=lambda rows: None, same_samples: bool = True,
                accumulate_same: int = 0, sequential: bool = False,
                split_step: bool = False, settle: int = 0,
                split_single: bool = False) -> list[dict]:
  """Section 1a. ``mge_modes``: ``terms`` (one pass per term, the per-level
  statistics kept) and/or ``by-mesh`` (one pass per mesh); with
  ``split_step`` each as one program per pass (with ``split_single`` the
  single-scale steps too). ``same_samples=False``
  leaves out single-scale on the MGE step's samples (the slowest step), and
  with it the speed, #WU and memory ratios. That step is split into
  ``accumulate_same`` micro-batches with gradient accumulation (0: only when
  its planned memory, estimated from the batch-``N0`` step, would not fit;
  see :func:`accumulation_for`); it is still one optimizer step on the same
  samples, and its time is that of all its calls. ``sequential`` runs every
  step's model passes (meshes, terms, chunks) one after another; then a
  chunked step plans one chunk's memory, which the fit estimate uses.

  Each model and size compiles all its steps first, then times them in
  interleaved rounds (:func:`_time_interleaved`). ``speed_ratio`` is the
  ratio of the medians; ``speed_ratio_rounds`` has the ratio within each
  round, whose spread shows how far the machine's noise moves it.
  ``chunk_pixels``: the chunk size, or a function of the finest mesh's side
  that gives it (as :func:`experiments.denoise.default_chunk_pixels`); each
  row records the one it used."""
  rows = []
  for model_name in config.models:
    model = _bench_model(model_name, config.compute_dtype, config.conv_algorithm)
    loss_fn = make_loss_fn(model)
    for size in config.sizes:
      hierarchy = Hierarchy(levels=config.levels, size=size, base_batch=config.base_batch,
                            restriction="nearest")
      pool = jax.random.uniform(jax.random.key(1), (512, size, size, 3), minval=-1, maxval=1)
      params = init_params(model, jax.random.key(0), jnp.zeros((1, size, size, 3)),
                           jnp.zeros((1,)))
      total = hierarchy.total_batch
      mge_stage = fm.multiscale_schedule(hierarchy, 1)[0]
      stages = {f"single_b{config.base_batch}": (fm.Stage((0,), (config.base_batch,), 1),
                                                 False)}
      for mode in mge_modes:
        stages[_mge_key(config.levels, mode, split_step)] = (mge_stage, mode == "by-mesh")
      if same_samples:
        stages[f"single_b{total}"] = (fm.Stage((0,), (total,), 1), False)
      chunk = chunk_pixels(size) if callable(chunk_pixels) else chunk_pixels
      row = {"model": model_name, "size": size, "levels": config.levels,
             "chunk_pixels": chunk}
      steps = {}
      for key, (stage, fuse) in stages.items():
        accumulate = 1
        if key == f"single_b{total}":
          # Planned memory grows linearly with the batch: estimate it from the
          # batch-N0 step, and split the batch where it would not fit.
          # Sequential chunks plan one chunk's memory, for both batches.
          small = row[f"single_b{config.base_batch}"]["temp_bytes"]
          live, live_small = total, config.base_batch
          if (sequential or split_single) and chunk:
            # A split step's chunk programs run one after another, as a
            # rolled loop's chunks do, so both take chunk_cap's sequential cap.
            cap = chunk_cap(sequential=True)
            live = chunk_size(total, size * size, chunk, cap)
            live_small = chunk_size(config.base_batch, size * size, chunk, cap)
          estimate = small * live // live_small if small else None
          accumulate = accumulate_same or accumulation_for(estimate, total,
                                                           memory_budget_bytes())
          if accumulate > 1:
            row["single_same_estimated_temp_bytes"] = estimate
            stage = fm.Stage((0,), (total // accumulate,), 1)
        progress(f"  {model_name} {size}^2 {key}: compiling"
                 + (f" (in {accumulate} accumulated micro-batches)" if accumulate > 1 else ""))
        row[key], steps[key] = _compile_stage(stage, hierarchy, loss_fn, params, pool,
                                              chunk, fuse, accumulate=accumulate,
                                              sequential=sequential,
                                              split_step=key.endswith("_split") or
                                              (split_single and key.startswith("single_")))
        progress(f"    compile {row[key]['compile_seconds']:.1f} s, "
                 f"temp {row[key]['temp_bytes']} B")
      progress(f"  {model_name} {size}^2: {config.repeats} interleaved rounds of "
               f"{', '.join(steps)}")
      for key, times in _time_interleaved(steps, config.repeats, settle).items():
        row[key].update(seconds_per_step=statistics.median(times), samples=times)
        progress(f"    {key}: {row[key]['seconds_per_step'] * 1e3:.2f} ms/step")
      del steps   # frees the compiled steps and their states before the next size
      mge_key = min((_mge_key(config.levels, m, split_step) for m in mge_modes),
                    key=lambda k: row[k]["seconds_per_step"])
      mge = row[mge_key]
      row["fastest_mge"] = mge_key
      if not same_samples:
        rows.append(row)
        on_row(rows)
        continue
      same = row[f"single_b{total}"]
      row["speed_ratio"] = same["seconds_per_step"] / mge["seconds_per_step"]
      row["speed_ratio_rounds"] = ratios_per_round(same["samples"], mge["samples"])
      row["wu_ratio"] = same["work_units_per_step"] / mge["work_units_per_step"]
      row["in_base_steps"] = in_base_steps(row[f"single_b{config.base_batch}"],
                                           {mge_key: mge, f"single_b{total}": same})
      if mge["temp_bytes"] and same["temp_bytes"] and "accumulated_in" not in same:
        row["memory_ratio"] = mge["temp_bytes"] / same["temp_bytes"]
      rows.append(row)
      on_row(rows)
  return rows


def in_base_steps(base: dict, steps: dict[str, dict]) -> dict[str, dict]:
  """Each step's time and #WU in units of the single-scale batch-``N0`` step.

  ``seconds`` is the median over rounds of the step's time over the base
  step's time in the same round; ``work_units`` is the same quotient of
  #WU, the closed form (4 levels, batches 16..128: MGE 2.31, single b240
  15). A step whose ``seconds`` sits above its ``work_units`` costs more
  per unit of work than the base step. The speed ratio is the #WU ratio
  times single-same's ``seconds / work_units`` over the MGE step's, up to
  how the medians are taken. On a compute-bound CPU every model pass costs
  about the same per pixel, so both quotients sit near 1 and the speed
  ratio near the #WU ratio (2026-12-05: MGE 2.02-2.36 b16 steps, b240
  14.2-15.9; docs/benchmark_cpu.md).
  """
  return {k: {"seconds": median_ratio_per_round(s["samples"], base["samples"]),
              "work_units": s["work_units_per_step"] / base["work_units_per_step"]}
          for k, s in steps.items()}


def ratios_per_round(times: list[float], reference: list[float]) -> list[float]:
  """``times[r] / reference[r]`` for each round ``r`` of two programs timed in
  the same interleaved rounds: a drift of the machine's speed between
  rounds cancels out of each."""
  return [t / r for t, r in zip(times, reference)]


def median_ratio_per_round(times: list[float], reference: list[float]) -> float:
  """The median of :func:`ratios_per_round`."""
  return statistics.median(ratios_per_round(times, reference))


def _mge_key(levels: int, mode: str, split_step: bool = False) -> str:
  by_mesh = "_by_mesh" if mode == "by-mesh" else ""
  return f"mge{levels}{by_mesh}" + ("_split" if split_step else "")


BENCH_LAYERS = ("conv3x3", "mfc", "conv3x3-winograd")


def layer_problem(layer_name: str, channels: int, size: int, batch: int):
  """One layer of section ``mfc``, its input, params and a scalar loss.

  ``layer_name`` is ``"mfc"`` (:class:`MeshFreeConv`), ``"conv3x3"``
  (``standard_conv(..., algorithm="direct")``: a SAME-padded 3x3
  ``nn.Conv`` on XLA's direct convolution, the issue's reference) or
  ``"conv3x3-winograd"`` (the same layer with ``algorithm="winograd"``, what
  the models use on CPU), ``channels`` in and out. The input ``x`` is
  ``(batch, size, size, channels)`` standard normal; the loss is
  ``0.5 * sum(layer(x)**2)``, so its gradient w.r.t. ``(params, x)`` runs the
  layer's whole backward pass. Returns ``(layer, params, x, loss)``; the
  benchmark and ``experiments.profile_step --program layer`` share it so that
  they time the same program.
  """
  if layer_name not in BENCH_LAYERS:
    raise ValueError(f"layer must be one of {BENCH_LAYERS}, got {layer_name!r}")
  if layer_name == "mfc":
    layer = MeshFreeConv(channels)
  else:
    layer = standard_conv(channels, 3, algorithm="winograd" if layer_name == "conv3x3-winograd"
                          else "direct")
  x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
  params = layer.init(jax.random.key(1), x)

  def loss(p, v):
    return 0.5 * jnp.sum(jnp.square(layer.apply(p, v)))

  return layer, params, x, loss


def bench_mfc(config: BenchConfig, progress=print, settle: int = 1) -> list[dict]:
  """Section ``mfc``: each layer's forward and forward+backward seconds.

  The MFC is compared with XLA's direct 3x3 conv (``mfc_over_conv_*``, the
  issue's target) and, when this run's convs are Winograd (CPU by default),
  also with the Winograd conv the models use (``mfc_over_winograd_*``).
  At each channel count and size the layers' programs are timed in
  ``config.repeats`` interleaved rounds (:func:`_time_interleaved`), as the
  steps are: each figure is a median over rounds, each ratio the ratio of
  two medians, and ``*_rounds`` lists the ratio in every round. (Timed one
  layer after another, the MFC against the Winograd conv at 128^2 read
  0.92-0.94 on one day and 1.03-1.05 on another, 2026-12-05 and 12-06.)
  ``settle`` untimed calls precede each timed one (``--settle``): without
  them each call was the first after another layer's program, and on this
  CPU VM paid for faulting its buffers in afresh (the Winograd conv at 256^2
  took 6.8 s a call against 2.3-2.5 s timed on its own).
  """
  layers = [name for name in BENCH_LAYERS
            if name != "conv3x3-winograd"
            or resolve_conv_algorithm(config.conv_algorithm) == "winograd"]
  rows = []
  for channels in config.mfc_channels:
    for size in config.mfc_sizes:
      row = {"channels": channels, "size": size, "batch": config.mfc_batch}
      programs = {}
      for name in layers:
        progress(f"  {name} {channels}ch {size}^2 ...")
        layer, params, x, loss = layer_problem(name, channels, size, config.mfc_batch)
        if name == "mfc":
          chunking = layer.fft_chunking(x.shape, x.dtype)
          packed = layer.packs_images(x.shape, x.dtype)
        fwd = jax.jit(layer.apply)
        fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        key = name.replace("-", "_")
        programs[f"{key}_forward"] = functools.partial(fwd, params, x)
        programs[f"{key}_forward_backward"] = functools.partial(fwd_bwd, params, x)
      for program in programs.values():  # compile and warm up
        jax.block_until_ready(program())
      times = _time_interleaved(programs, config.repeats, settle)
      row.update({key: statistics.median(ts) for key, ts in times.items()})
      for other, reference in (("conv", "conv3x3"), ("winograd", "conv3x3_winograd")):
        if f"{reference}_forward_backward" in times:
          row[f"mfc_over_{other}_forward_backward"] = (
              row["mfc_forward_backward"] / row[f"{reference}_forward_backward"])
          row[f"mfc_over_{other}_forward_backward_rounds"] = ratios_per_round(
              times["mfc_forward_backward"], times[f"{reference}_forward_backward"])
      row["mfc_fft_chunking"] = None if chunking is None else list(chunking)
      row["mfc_packs_images"] = packed
      rows.append(row)
  return rows


FIRST_STEP_RUNS = ("cold", "warm", "warm_step_cache")


def bench_first_step(config: BenchConfig, mode: str, device: str | None, cache_dir: Path,
                     progress=print, sequential: bool = False,
                     runs: tuple[str, ...] = FIRST_STEP_RUNS,
                     init_platform: str | None = None,
                     split_step: bool = False) -> list[dict]:
  """Section ``first-step``: a fresh process's time to its first training step.

  For each model, ``python -m experiments.first_step`` runs three times in
  new processes, as a user's first and later runs would:

  * ``cold``: empty caches; it fills JAX's persistent compilation cache and
    a :class:`mgtrain.step_cache.StepCache` (its ``compile`` phase includes
    writing the step, under a second for the UNet).
  * ``warm``: the persistent compilation cache alone. The process still
    traces and lowers the step; the cache replaces XLA's compile.
  * ``warm_step_cache``: both caches; the step cache's hit skips tracing,
    lowering and compiling.

  The child reports ``since_start`` (its time from its first line to the
  end of the first step) and ``phases``: imports, init, the train state,
  trace and lower, compile (or the step's load) and the first step.
  ``wall_to_exit`` is measured here, from spawning the process to its exit,
  so it also holds interpreter start-up and teardown. ``cache_dir`` is
  emptied first. ``sequential`` is passed on (``--sequential on|off``).
  ``runs`` picks some of them, in this order (``("cold",)`` times a cold
  compile alone, e.g. under other ``XLA_FLAGS``, which the children inherit).
  ``init_platform`` (e.g. ``"cpu"``) is passed on as ``--init-platform``,
  ``split_step`` as ``--split-step``.
  """
  import shutil
  unknown = set(runs) - set(FIRST_STEP_RUNS)
  if unknown or not runs:
    raise ValueError(f"first-step runs must be some of {FIRST_STEP_RUNS}, not {runs}")
  rows = []
  for model_name in config.first_step_models:
    cache = cache_dir / model_name
    shutil.rmtree(cache, ignore_errors=True)
    row = {"model": model_name, "size": config.first_step_size, "levels": config.levels,
           "base_batch": config.base_batch, "mge": mode, "split_step": split_step}
    for run in (r for r in FIRST_STEP_RUNS if r in runs):
      progress(f"  first step, {model_name} {config.first_step_size}^2 {mode}, {run} ...")
      step_cache = [] if run == "warm" else ["--step-cache", str(cache / "steps")]
      cmd = [sys.executable, "-m", "experiments.first_step", "--model", model_name,
             "--size", str(config.first_step_size), "--levels", str(config.levels),
             "--base-batch", str(config.base_batch), "--mge", mode,
             "--sequential", "on" if sequential else "off",
             "--conv-algorithm", config.conv_algorithm,
             "--compile-cache", str(cache / "xla"), *step_cache] + (
                 ["--device", device] if device else []) + (
                 ["--init-platform", init_platform] if init_platform else []) + (
                 ["--split-step"] if split_step else [])
      t0 = time.perf_counter()
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                            cwd=Path(__file__).resolve().parents[1])
      wall = time.perf_counter() - t0
      lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
      if proc.returncode or not lines:
        row[run] = {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
        continue
      child = json.loads(lines[-1])
      row[run] = {"wall_to_exit": wall, **child}
      progress(f"    {child['before_first_step']:.1f} s before the first step "
               f"({', '.join(f'{k} {v:.1f}' for k, v in child['phases'].items())})")
    rows.append(row)
  return rows


def first_step_table(rows: list[dict]) -> str:
  labels = {"cold": "cold", "warm": "warm (XLA cache)",
            "warm_step_cache": "warm (XLA + step cache)"}
  lines = ["| model | res | step | run | imports s | init s | state s | trace+lower s | "
           "compile or load s | first step s | time to first step s (in process) | "
           "process wall s | initial params (sha256) |",
           "|---" * 13 + "|"]
  for r in rows:
    step = r["mge"] + (" split" if r.get("split_step") else "")
    for run in FIRST_STEP_RUNS:
      if run not in r:
        continue
      c = r[run]
      if "phases" not in c:
        lines.append(f"| {r['model']} | {r['size']} | {step} | {labels[run]} | "
                     f"{c.get('error', 'not run')} |" + " |" * 8)
        continue
      ph = c["phases"]
      lines.append(f"| {r['model']} | {r['size']} | {step} | {labels[run]} | "
                   f"{ph['imports']:.1f} | {ph['init']:.1f} | {ph['state']:.1f} | "
                   f"{ph['trace_and_lower']:.1f} | {ph['compile']:.1f} | "
                   f"{ph['first_step']:.2f} | {c['since_start']:.1f} | {c['wall_to_exit']:.1f} | "
                   f"{c.get('params_sha256', '')[:12]} |")
  return "\n".join(lines)


def bench_torch(sizes, repeats: int, twin: Path, progress=print, same_samples: bool = True,
                on_row=lambda rows: None) -> dict:
  """Section 1b: the PyTorch twin of the ResNet, timed in a subprocess of this run.

  ``experiments.torch_steps`` runs the twin's model and step
  (``torch_twin.py``: single b16, a 4-level MGE step 16/32/64/128 and single
  b240, on pre-staged CPU tensors with no sampling or noise inside the step,
  which mgtrain's step does on the device) and prints each time as soon as
  it has it. A step that kills the process (single b240 at 128^2 needs more
  than 24 GB in PyTorch) is recorded under ``errors``; the others are kept.
  Returns ``{"skipped": reason}`` when torch or the twin is not there.
  """
  if importlib.util.find_spec("torch") is None:
    return {"skipped": "torch is not installed (pip install torch, the CPU wheel)"}
  if not twin.is_file():
    return {"skipped": f"no PyTorch twin at {twin} (--torch-twin PATH)"}
  kinds = ["single_b16", "mge4"] + (["single_b240"] if same_samples else [])
  rows = []
  for size in sizes:
    progress(f"  torch twin {size}^2 ...")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.torch_steps", "--twin", str(twin), "--res",
         str(size), "--reps", str(repeats), "--kinds", *kinds],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1])
    row = {"res": size}
    for line in proc.stdout.splitlines():
      if line.startswith("{"):
        row.update(json.loads(line))
    missing = [k for k in kinds if k not in row]
    if missing:
      why = (f"killed (exit {proc.returncode}; -9 is usually out of memory)"
             if proc.returncode < 0 else
             f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
      row["errors"] = {k: why for k in missing}
    progress("    " + ", ".join(f"{k} {row[k]:.3g} s" if k in row else f"{k}: {why}"
                                  for k in kinds))
    rows.append(row)
    on_row(rows)
  return {"twin": str(twin), "rows": rows}


def bracket_torch_rows(before: list[dict], after: list[dict]) -> list[dict]:
  """Per size, the twin's times from a run just before and one just after
  the JAX steps, and their mean under each step's name.

  A drift of the machine's speed over the minutes between the two
  frameworks' timings cancels to first order in the mean (it moved the
  JAX / PyTorch ratio at 64^2, batch 16, between 0.90 and 1.21 from run to
  run when the twin ran once, after all JAX steps). A step that failed in
  either run is kept under ``errors``.

  >>> bracket_torch_rows([{"res": 64, "single_b16": 1.0}], [{"res": 64, "single_b16": 1.2}])[0]["single_b16"]
  1.1
  """
  rows = []
  for b, a in zip(before, after, strict=True):
    row = {"res": b["res"], "before": b, "after": a}
    for kind in ("single_b16", "mge4", "single_b240"):
      if kind in b and kind in a:
        row[kind] = (b[kind] + a[kind]) / 2
    errors = {k: v for k, v in {**a.get("errors", {}), **b.get("errors", {})}.items()
              if k not in row}
    if errors:
      row["errors"] = errors
    rows.append(row)
  return rows


def table1_hierarchy(size: int, images: int, coarsest: int = 16, base_batch: int = 16,
                     restriction: str = "nearest") -> Hierarchy:
  """The MGE paper's Table 1 set-up for a finest mesh ``size``.

  Meshes ``size, size/2, ..., coarsest``; batch 16 on the finest mesh,
  doubling toward the coarse ones, and the coarsest level gets all the
  remaining images. For 512 images at 256^2 that is 16/32/64/128/272, i.e.
  2 * 240 + 272 = 752 loss evaluations (the paper's count; 624, 560, 528 and
  512 for 128^2..16^2).
  """
  levels = int(math.log2(size // coarsest)) + 1
  if coarsest * 2 ** (levels - 1) != size:
    raise ValueError(f"size {size} is not {coarsest} times a power of two")
  batches = [base_batch * 2 ** j for j in range(levels - 1)]
  rest = images - sum(batches)
  if rest < 1:
    raise ValueError(f"{images} images do not cover the batches {batches} plus a coarsest level")
  return Hierarchy(levels=levels, size=size, batch_sizes=tuple(batches) + (rest,),
                   restriction=restriction)


def bench_loss_eval(config: BenchConfig, model_name: str, chunk_pixels: int,
                    progress=print) -> list[dict]:
  """Section 1e: Table 1 of the MGE paper, loss evaluation only (no gradient).

  For each finest mesh ``n``: the denoising loss of ``images`` images on
  mesh ``n`` (single-scale) against the telescoping MGE loss with the batches
  of :func:`table1_hierarchy`, each one jitted function timed as a median.
  Both evaluate their batches in chunks of at most ``chunk_pixels`` samples
  x pixels with ``jax.lax.map`` (one compiled loop body per mesh), so the
  working set stays bounded at 256^2. Images are random (timing only).
  """
  model = _bench_model(model_name, config.compute_dtype, config.conv_algorithm)
  loss_fn = make_loss_fn(model)
  rows = []
  for size in config.loss_eval_sizes:
    h = table1_hierarchy(size, config.loss_eval_images)
    key = jax.random.key(size)
    params = init_params(model, jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,)))

    # One program per batch size: run op by op, the sampler compiled each of
    # its ops for each size (5 s of the smoke run's 26 s).
    @functools.partial(jax.jit, static_argnums=1)
    def batch_of(k, n):
      pool = jax.random.uniform(k, (n, size, size, 3), minval=-1, maxval=1)
      return sample_denoise_batch(pool, jax.random.fold_in(k, 1), n)

    def chunked_mean(p, batch):
      n, side = batch["u"].shape[0], batch["u"].shape[1]
      c = chunk_size(n, side * side, chunk_pixels)
      chunks = jax.tree.map(lambda x: x.reshape((n // c, c) + x.shape[1:]), batch)
      return jnp.mean(jax.lax.map(lambda b: loss_fn(p, b), chunks))

    def single(p, batch):
      return chunked_mean(p, batch)

    def multiscale_loss(p, batches):
      total = 0.0
      for views in level_views(batches, h):
        total = total + chunked_mean(p, views[0])
        if len(views) == 2:
          total = total - chunked_mean(p, views[1])
      return total

    single_batch = batch_of(key, config.loss_eval_images)
    keys = jax.random.split(jax.random.fold_in(key, 2), h.levels)
    mge_batches = [batch_of(k, n) for k, n in zip(keys, h.batch_sizes)]
    row = {"size": size, "levels": h.levels, "batch_sizes": list(h.batch_sizes),
           "images": config.loss_eval_images,
           "loss_evaluations": {"single": config.loss_eval_images,
                                "mge": 2 * sum(h.batch_sizes[:-1]) + h.batch_sizes[-1]},
           "work_units": {"single": config.loss_eval_images,
                          "mge": float(wu.step_work_units(range(h.levels), h.batch_sizes))}}
    for name, fn, arg in (("single", single, single_batch), ("mge", multiscale_loss, mge_batches)):
      progress(f"  loss-eval {size}^2 {name} ...")
      t0 = time.perf_counter()
      compiled = jax.jit(fn).lower(params, arg).compile()
      row[f"{name}_compile_seconds"] = time.perf_counter() - t0
      jax.block_until_ready(compiled(params, arg))   # warm-up
      row[f"{name}_seconds"] = timing.median_seconds(lambda: compiled(params, arg),
                                                      config.repeats)[0]
    row["speed_ratio"] = row["single_seconds"] / row["mge_seconds"]
    row["wu_ratio"] = row["work_units"]["single"] / row["work_units"]["mge"]
    rows.append(row)
  return rows


def loss_eval_table(rows: list[dict], model_name: str) -> str:
  lines = [f"Loss evaluation ({model_name}, no gradient) over {rows[0]['images']} images; "
           "MGE batches 16, 32, ... on the finer meshes and the rest on 16^2 (MGE paper "
           "Table 1's set-up).", "",
           "| finest mesh | loss evaluations single / MGE | single s | MGE s | speed ratio | "
           "#WU ratio |", "|---" * 6 + "|"]
  for r in rows:
    ev = r["loss_evaluations"]
    lines.append(f"| {r['size']}^2 | {ev['single']} / {ev['mge']} | {r['single_seconds']:.4g} | "
                 f"{r['mge_seconds']:.4g} | {r['speed_ratio']:.2f}x | {r['wu_ratio']:.2f}x |")
  return "\n".join(lines)


def bench_pipeline(denoise_config: str, model: str, data_dir: str | None, steps: int,
                   chunk_pixels: int | None, fuse_meshes: bool, progress=print,
                   sequential: bool = False, conv_algorithm: str = "auto") -> dict:
  """Section 1f: is data the bottleneck? Steps/s of the same step with and without its data work.

  The Multiscale step of the denoising config (``experiments.denoise``), on
  real photographs (the bundled ones, or ``data_dir``):

  * ``train_loop``: :func:`mgtrain.full_multiscale.train` as the CLI runs it
    (patch pool on the device, patches drawn, flipped and noised inside the
    jitted step, Python loop with #WU bookkeeping), ``steps`` steps;
  * ``pre_staged``: the same step with the sampling replaced by fixed,
    already degraded batches (no data work at all), called back to back.

  ``pre_staged / train_loop`` close to 1 means the input pipeline costs
  nothing measurable.
  """
  from experiments import denoise  # pylint: disable=g-import-not-at-top
  from experiments.configs import get_config  # pylint: disable=g-import-not-at-top

  config = get_config(denoise_config)
  data = denoise.load_data(config, "folder" if data_dir else "bundled", data_dir,
                           download=False)
  net = denoise.build_model(model, conv_algorithm=conv_algorithm)
  loss_fn = make_loss_fn(net)
  h = Hierarchy(levels=config.levels, size=config.size, base_batch=config.base_batch,
                batch_growth=config.batch_growth, restriction="nearest")
  stage = fm.multiscale_schedule(h, steps)[0]
  params = init_params(net, jax.random.key(0), jnp.zeros((1, config.size, config.size, 3)),
                       jnp.zeros((1,)))
  out = {"denoise_config": denoise_config, "model": model, "data": data.description,
         "steps": steps, "batch_sizes": list(stage.batch_sizes)}

  progress("  pipeline: train loop ...")
  _, history = fm.train(params=params, stages=[stage], hierarchy=h, loss_fn=loss_fn,
                        sample_fn=sample_denoise_batch, data=data.pool,
                        make_optimizer=lambda n: optax.adam(1e-4), progress=False,
                        max_pixels_per_chunk=chunk_pixels, fuse_meshes=fuse_meshes,
                        sequential=sequential)
  out["train_loop_steps_per_second"] = steps / sum(history["train_seconds"])

  # Fixed, already degraded batches: the step minus all data work.
  sample = jax.jit(sample_denoise_batch, static_argnums=2)
  staged = {str(n): sample(data.pool, jax.random.key(n), n) for n in stage.batch_sizes}
  progress("  pipeline: pre-staged batches ...")
  tx = multiscale(optax.adam(1e-4), len(stage.levels), level_terms=not fuse_meshes)
  step = jax.jit(fm.make_stage_step(stage, h, loss_fn, lambda d, key, n: d[str(n)], tx,
                                    chunk_pixels, fuse_meshes, sequential),
                 donate_argnums=0)
  p = jax.tree.map(jnp.copy, params)
  state = fm.init_state(p, seed=0, opt_state=tx.init(p))
  compiled = step.lower(state, staged).compile()
  state = jax.block_until_ready(compiled(state, staged)[0])
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, staged)
  jax.block_until_ready(metrics["loss"])
  out["pre_staged_steps_per_second"] = steps / (time.perf_counter() - t0)
  out["pre_staged_over_train_loop"] = (out["pre_staged_steps_per_second"]
                                       / out["train_loop_steps_per_second"])
  return out


def pipeline_table(p: dict) -> str:
  return "\n".join([
      f"Input pipeline: {p['model']} Multiscale step of the {p['denoise_config']} denoising "
      f"config (batches {p['batch_sizes']}), {p['steps']} steps, {p['data']}.", "",
      "| train loop (real photos, on-device sampling + noise) steps/s | "
      "pre-staged batches steps/s | pre-staged / train loop |",
      "|---|---|---|",
      f"| {p['train_loop_steps_per_second']:.3g} | {p['pre_staged_steps_per_second']:.3g} | "
      f"{p['pre_staged_over_train_loop']:.2f} |"])


def _first_reach(evals: list[dict], target: float) -> dict | None:
  """The first evaluation with validation MSE <= target (None if none)."""
  for e in evals:
    if e["mse"] <= target:
      return e
  return None


def bench_time_to_mse(denoise_config: str, model: str, data_dir: str | None,
                      scales: tuple[int, ...], eval_every: int, workdir: Path,
                      chunk_pixels: int | None, progress=print,
                      sequential: bool = False, conv_algorithm: str = "auto",
                      split_step: bool = False) -> dict:
  """Section 1d: wall time for Full-Multiscale to reach single-scale's final MSE.

  Trains single-scale on the denoising config (``experiments.denoise``) and
  takes its final validation MSE as the target. Then trains Full-Multiscale
  with its iterations scaled by each factor in ``scales`` (1 is the config's
  own schedule) until one reaches the target. Both runs evaluate every
  ``eval_every`` steps and at stage ends; "time to target" is the train +
  compile seconds spent up to the first evaluation at or below the target
  (evaluation time excluded). Runs start fresh: ``workdir`` is cleared.
  ``split_step``: both train with one program per model pass
  (``experiments.denoise --split-step``, on by default on a one-device CPU).
  """
  import shutil  # pylint: disable=g-import-not-at-top
  from experiments import denoise  # pylint: disable=g-import-not-at-top
  from experiments.configs import get_config  # pylint: disable=g-import-not-at-top

  config = dataclasses.replace(get_config(denoise_config), eval_every=eval_every)
  dataset = "folder" if data_dir else "bundled"
  data = denoise.load_data(config, dataset, data_dir, download=False)
  if workdir.exists():
    shutil.rmtree(workdir)

  def run(strategy, cfg, name):
    progress(f"  time-to-mse: {name} ...")
    r = denoise.run_strategy(cfg, strategy, workdir / name, data=data, model_name=model,
                             progress=False, chunk_pixels=chunk_pixels,
                             sequential=sequential, conv_algorithm=conv_algorithm,
                             split_step=split_step)
    return {"iterations": [s["iterations"] for s in r["stages"]],
            "work_units": r["work_units"], "final_mse": r["metrics"]["mse"],
            "train_seconds": r["train_seconds"], "compile_seconds": r["compile_seconds"],
            "evals": [{k: e[k] for k in ("step", "work_units", "mse", "train_seconds",
                                         "compile_seconds")} for e in r["evals"]]}

  single = run("single", config, "single")
  target = single["final_mse"]
  hit = _first_reach(single["evals"], target)
  single["time_to_target"] = hit["train_seconds"] + hit["compile_seconds"]
  single["work_units_to_target"] = hit["work_units"]
  out = {"denoise_config": denoise_config, "model": model, "data": data.description,
         "split_step": split_step, "target_mse": target, "single": single,
         "full_multiscale": []}
  for k in scales:
    cfg = dataclasses.replace(config, fms_coarsest_iterations=k * config.fms_coarsest_iterations)
    fms = run("full-multiscale", cfg, f"full-multiscale-x{k}")
    fms["scale"] = k
    hit = _first_reach(fms["evals"], target)
    fms["reached"] = hit is not None
    if hit is not None:
      fms["time_to_target"] = hit["train_seconds"] + hit["compile_seconds"]
      fms["work_units_to_target"] = hit["work_units"]
      fms["speedup"] = single["time_to_target"] / fms["time_to_target"]
    out["full_multiscale"].append(fms)
    if hit is not None:
      break
  return out


def time_to_mse_table(ttm: dict) -> str:
  s = ttm["single"]
  lines = [f"Target: single-scale's final validation MSE {ttm['target_mse']:.4f} "
           f"({ttm['model']}, config {ttm['denoise_config']}, {ttm['data']}; "
           f"{'one program per model pass' if ttm.get('split_step') else 'one program per step'})."
           , "",
           "| run | iterations | final MSE | reached target | time to target s (train + compile) "
           "| #WU to target | speed-up vs single |", "|---" * 7 + "|",
           f"| single | {s['iterations']} | {s['final_mse']:.4f} | yes | "
           f"{s['time_to_target']:.1f} | {s['work_units_to_target']:,.0f} | 1.00x |"]
  for f in ttm["full_multiscale"]:
    if f["reached"]:
      lines.append(f"| Full-Multiscale x{f['scale']} | {f['iterations']} | {f['final_mse']:.4f} | "
                   f"yes | {f['time_to_target']:.1f} | {f['work_units_to_target']:,.0f} | "
                   f"{f['speedup']:.2f}x |")
    else:
      total = f["train_seconds"] + f["compile_seconds"]
      lines.append(f"| Full-Multiscale x{f['scale']} | {f['iterations']} | {f['final_mse']:.4f} | "
                   f"no ({total:.1f} s spent) | - | - | - |")
  return "\n".join(lines)


def torch_table(torch_out: dict, step_rows: list[dict]) -> str:
  if "skipped" in torch_out:
    return f"PyTorch twin: skipped ({torch_out['skipped']})."
  jax_rows = {r["size"]: r for r in step_rows if r["model"] == "resnet" and r["levels"] == 4
              and "single_b16" in r}
  lines = ["| res | torch single b16 s | torch MGE s | torch single b240 s | torch b240 / MGE | "
           "JAX / torch, single b16 | JAX / torch, MGE | JAX / torch, single b240 |",
           "|---" * 8 + "|"]

  def seconds(t, key):
    return f"{t[key]:.3g}" if key in t else t.get("errors", {}).get(key, "not run")

  def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b is not None else "n/a"

  for t in torch_out["rows"]:
    cells = [seconds(t, "single_b16"), seconds(t, "mge4"), seconds(t, "single_b240"),
             f"{t['single_b240'] / t['mge4']:.2f}x" if "single_b240" in t and "mge4" in t
             else "n/a"]
    j = jax_rows.get(t["res"])
    if j is None:
      cells += ["n/a (no JAX ResNet row at this size)"] * 3
    else:
      def jax_s(key):
        return j[key]["seconds_per_step"] if key in j else None
      cells += [ratio(jax_s("single_b16"), t.get("single_b16")),
                ratio(jax_s(j["fastest_mge"]), t.get("mge4")),
                ratio(jax_s("single_b240"), t.get("single_b240"))]
    lines.append(f"| {t['res']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def steps_table(rows: list[dict]) -> str:
  if not rows:
    return ""
  levels = rows[0]["levels"]
  keys = [k for k in rows[0] if k.startswith(("single_b", "mge"))]
  # --split-single: single-scale steps split too, under their usual keys.
  split_single = {k for k in keys if rows[0][k].get("split_step") and not k.endswith("_split")}
  head = " | ".join(f"{k}{' split' if k in split_single else ''} s/step (compile s)"
                    for k in keys)
  lines = [f"| model | res | chunk px | {head} | speed ratio single-same / fastest mge "
           "| per round (min-max) | #WU ratio | mge / single-same in base steps: time (#WU) "
           "| working memory mge / single-same | working memory GB "
           f"({' / '.join(keys)}) |",
           "|---" * (len(keys) + 9) + "|"]
  for r in rows:
    chunk = r.get("chunk_pixels") or "off"
    if isinstance(chunk, int) and chunk & (chunk - 1) == 0:
      chunk = f"2^{chunk.bit_length() - 1}"
    cells = " | ".join(
        f"{r[k]['seconds_per_step']:.4g} ({r[k]['compile_seconds']:.1f})"
        + (f", {r[k]['accumulated_in']} x b{r[k]['micro_batch_sizes'][0]} accumulated"
           if "accumulated_in" in r[k] else "") for k in keys)
    mem = f"{r['memory_ratio']:.3f}" if "memory_ratio" in r else "n/a"
    speed = f"{r['speed_ratio']:.2f}x" if "speed_ratio" in r else "n/a"
    wu_ratio = f"{r['wu_ratio']:.2f}x" if "wu_ratio" in r else "n/a"
    rounds = r.get("speed_ratio_rounds")
    spread = f"{min(rounds):.2f}-{max(rounds):.2f}x" if rounds else "n/a"
    gigabytes = " / ".join(f"{r[k]['temp_bytes'] / 1e9:.2f}" if r[k].get("temp_bytes")
                           else "n/a" for k in keys)
    base = r.get("in_base_steps")
    cost = (" / ".join(f"{v['seconds']:.2f}" for v in base.values()) + " ("
            + " / ".join(f"{v['work_units']:.2f}" for v in base.values()) + ")"
            if base else "n/a")
    lines.append(f"| {r['model']} | {r['size']} | {chunk} | {cells} | {speed} | {spread} "
                 f"| {wu_ratio} | {cost} | {mem} | {gigabytes} |")
  return f"MGE with {levels} levels\n\n" + "\n".join(lines)


def _ratio_cell(row: dict, other: str) -> str:
  """``0.93 (0.90-0.97)``: an MFC ratio of medians and its per-round range."""
  ratio = row[f"mfc_over_{other}_forward_backward"]
  rounds = row.get(f"mfc_over_{other}_forward_backward_rounds")
  return f"{ratio:.2f}" + (f" ({min(rounds):.2f}-{max(rounds):.2f})" if rounds else "")


def mfc_table(rows: list[dict]) -> str:
  if not rows:
    return ""
  winograd = "conv3x3_winograd_forward_backward" in rows[0]
  head = ["channels", "res", "3x3 conv fwd s", "MFC fwd s", "3x3 conv fwd+bwd s",
          "MFC fwd+bwd s", "MFC / conv (fwd+bwd; per round)"]
  if winograd:
    head += ["Winograd 3x3 conv fwd+bwd s", "MFC / Winograd conv (fwd+bwd; per round)"]
  head.append("MFC FFT chunks (images x channels); images per complex FFT")
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    cells = [str(r["channels"]), str(r["size"]), f"{r['conv3x3_forward']:.4g}",
             f"{r['mfc_forward']:.4g}", f"{r['conv3x3_forward_backward']:.4g}",
             f"{r['mfc_forward_backward']:.4g}", _ratio_cell(r, "conv")]
    if winograd:
      cells += [f"{r['conv3x3_winograd_forward_backward']:.4g}", _ratio_cell(r, "winograd")]
    chunking = r.get("mfc_fft_chunking")
    cells.append(("none" if chunking is None else f"{chunking[0]} x {chunking[1]}")
                 + ("; 2" if r.get("mfc_packs_images") else "; 1 (real FFTs)"))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def mesh_problem(model_name: str, model, hierarchy: Hierarchy) -> str | None:
  """Why ``model`` cannot take every mesh of ``hierarchy``, or None.

  A UNet halves its input ``log2(mesh_multiple)`` times, so each mesh side
  must be a multiple of ``mesh_multiple``; models without the attribute take
  any mesh.
  """
  multiple = getattr(model, "mesh_multiple", 1)
  bad = [s for s in hierarchy.sizes if s % multiple]
  if not bad:
    return None
  return (f"{model_name} needs image sides divisible by {multiple}, and the "
          f"{hierarchy.levels}-level hierarchy at {hierarchy.size}^2 has meshes "
          f"{', '.join(f'{s}^2' for s in bad)}")


def check_model_hierarchy(options: str, model_names, levels: int, size: int,
                          base_batch: int) -> None:
  """Exits with one line (naming ``options``) if ``size`` cannot be halved
  ``levels - 1`` times or one of ``model_names`` cannot take one of the
  hierarchy's meshes: before anything compiles. (The caller builds its own
  hierarchy after, so a coarse-mesh warning is left to that one.)"""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", CoarseMeshWarning)
      h = Hierarchy(levels=levels, size=size, base_batch=base_batch)
  except HierarchyError as e:
    raise SystemExit(f"{options}: {e}") from None
  for name in model_names:
    problem = mesh_problem(name, _bench_model(name), h)
    if problem:
      raise SystemExit(f"{options}: {problem}")


def check_hierarchies(config: BenchConfig) -> None:
  """:func:`check_model_hierarchy` for every steps size and model of ``config``."""
  for size in config.sizes:
    check_model_hierarchy("--models / --sizes / --levels / --base-batch", config.models,
                          config.levels, size, config.base_batch)


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", choices=sorted(CONFIGS), default=None,
                 help="default: 'gpu' on a GPU backend, else 'cpu'")
  p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                 help="JAX platform to run on (default: what JAX finds)")
  p.add_argument("--sections", nargs="+", default=list(DEFAULT_SECTIONS),
                 help=f"any of {SECTIONS} (default: {DEFAULT_SECTIONS})")
  p.add_argument("--models", nargs="+", choices=BENCH_MODELS, default=None)
  p.add_argument("--sizes", nargs="+", type=positive_int, default=None)
  p.add_argument("--levels", type=positive_int, default=None)
  p.add_argument("--base-batch", type=positive_int, default=None)
  p.add_argument("--compute-dtype", choices=sorted(COMPUTE_DTYPES), default=None,
                 help="steps and loss-eval: the models' compute dtype (default float32; "
                      "bfloat16 keeps float32 params, Adam and loss)")
  add_conv_algorithm_argument(p)
  p.add_argument("--repeats", type=positive_int, default=None)
  p.add_argument("--chunk-pixels", type=nonnegative_int, default=None,
                 help="per-level chunking as in experiments.denoise (default on CPU, by "
                      f"each hierarchy's finest mesh: {CPU_CHUNK_RULE}; off on GPU; 0 = off)")
  p.add_argument("--mge", nargs="+", choices=("terms", "by-mesh"), default=["terms", "by-mesh"],
                 help="MGE step variants to time: 'terms' (mgtrain.mge.mge_value_and_grad, "
                      "one pass per term, per-level statistics) and/or 'by-mesh' "
                      "(mge_value_and_grad_by_mesh, one pass per mesh)")
  p.add_argument("--settle", type=nonnegative_int, default=1,
                 help="steps and mfc: untimed calls before each timed call of every "
                      "round, as in a training loop (default 1 since 2026-12-05; the CPU "
                      "tables before that date were timed with 0)")
  p.add_argument("--split-step", action="store_true",
                 help="steps and first-step: each MGE step as one program per model pass "
                      "(mgtrain.split_step; experiments.denoise does this by default on "
                      "CPU). Off here, so that the tables time the one-program step unless "
                      "asked")
  p.add_argument("--split-single", action="store_true",
                 help="steps: the single-scale steps as one program per model pass too "
                      "(a chunked batch: one chunk program called per chunk, which "
                      "compiles one chunk whatever their number)")
  add_sequential_argument(p)
  p.add_argument("--skip-same-samples", action="store_true",
                 help="steps and torch: leave out single-scale on the MGE step's samples "
                      "(b240, the slowest step; the ratios against it are then n/a)")
  p.add_argument("--same-samples-accumulate", type=nonnegative_int, default=0,
                 help="steps: split single-scale on the MGE step's samples into this many "
                      "accumulated micro-batches (0: only where it would not fit in memory)")
  p.add_argument("--torch-bracket", action=argparse.BooleanOptionalAction, default=True,
                 help="with sections steps and torch: time the PyTorch twin just before and "
                      "just after JAX's steps at each size and use the mean of the two "
                      "(--no-torch-bracket: once, after all JAX steps)")
  p.add_argument("--torch-twin", type=Path, default=DEFAULT_TORCH_TWIN,
                 help="the PyTorch twin script for section 'torch' (default: %(default)s)")
  p.add_argument("--ttm-config", default=None, choices=sorted(DENOISE_CONFIGS),
                 help="time-to-mse: denoising config (default: the benchmark config's; "
                      "cpu4 has the paper's 4 levels, so Full-Multiscale's #WU saving is "
                      "16.7x rather than the 3-level cpu config's 5.7x)")
  p.add_argument("--ttm-model", default="resnet", choices=tuple(MODEL_CONVS),
                 help="time-to-mse: denoising model")
  p.add_argument("--ttm-data-dir", type=existing_folder, default=None,
                 help="time-to-mse and pipeline: image folder (default: the bundled "
                      "photographs)")
  p.add_argument("--ttm-scales", nargs="+", type=positive_int, default=[1, 2, 4],
                 help="time-to-mse: Full-Multiscale iteration multipliers to try, in order")
  p.add_argument("--ttm-eval-every", type=positive_int, default=20)
  p.add_argument("--ttm-split-step", choices=AUTO_CHOICES, default="auto",
                 help="time-to-mse: train as experiments.denoise --split-step does (auto: "
                      "one program per model pass on a one-device CPU, as that CLI runs "
                      "by default)")
  p.add_argument("--loss-eval-model", default="unet", choices=BENCH_MODELS,
                 help="loss-eval: model (the paper's Table 1 uses the UNet)")
  p.add_argument("--loss-eval-sizes", nargs="+", type=positive_int, default=None,
                 help="loss-eval: finest meshes (default: the config's)")
  p.add_argument("--loss-eval-chunk-pixels", type=positive_int, default=16 * 64 * 64,
                 help="loss-eval: samples x pixels per evaluated chunk")
  p.add_argument("--pipeline-steps", type=positive_int, default=None,
                 help="pipeline: steps per measurement (default 200 on GPU, 20 on CPU)")
  p.add_argument("--first-step-runs", nargs="+", choices=FIRST_STEP_RUNS,
                 default=list(FIRST_STEP_RUNS),
                 help="first-step: which fresh processes to run (default: all three; "
                      "'cold' alone times a cold compile, e.g. under other XLA_FLAGS)")
  p.add_argument("--init-platform", default=None,
                 help="first-step: initialise the model on this platform (e.g. cpu), then "
                      "move the parameters to the device (default: on the device)")
  p.add_argument("--workdir", default="runs/benchmark")
  p.add_argument("--compile-cache", default="",
                 help="persistent compilation cache dir (default off, so compile "
                      "times are cold)")
  return p.parse_args(argv)


# experiments.host_speed's sizes per backend ("smoke": the tests' quick run).
HOST_SPEED_SIZES = {"smoke": {"stream_mib": 16, "matmul_n": 256},
                    "gpu": {"stream_mib": 1024, "matmul_n": 4096}}


def main(argv=None) -> dict:
  args = parse_args(argv)
  runtime.use_device(args.device)
  runtime.enable_compilation_cache(args.compile_cache)
  for section in args.sections:
    if section not in SECTIONS:
      raise SystemExit(f"unknown section {section!r}; choose from {SECTIONS}")
  backend = jax.default_backend()
  config = CONFIGS[args.config or ("gpu" if backend == "gpu" else "cpu")]
  overrides = {k: v for k, v in dict(
      models=tuple(args.models) if args.models else None,
      sizes=tuple(args.sizes) if args.sizes else None, levels=args.levels,
      base_batch=args.base_batch, repeats=args.repeats, compute_dtype=args.compute_dtype,
      conv_algorithm=resolve_conv_algorithm(args.conv_algorithm),
      loss_eval_sizes=tuple(args.loss_eval_sizes) if args.loss_eval_sizes else None,
  ).items() if v is not None}
  config = dataclasses.replace(config, **overrides)
  if {"steps", "torch"} & set(args.sections):
    check_hierarchies(config)

  def chunk_for(finest_size: int) -> int | None:
    return resolve_chunk_pixels(args.chunk_pixels, backend, finest_size)
  sequential = resolve_sequential(args.sequential)

  def progress(msg):
    print(msg, file=sys.stderr, flush=True)

  out = {"config": dataclasses.asdict(config), "backend": backend,
         "device": str(jax.devices()[0]), "jax": jax.__version__,
         "platform": platform.platform(),
         # Each steps row records the chunk size it used.
         "chunk_pixels": ((args.chunk_pixels or None) if args.chunk_pixels is not None
                          else (f"by finest mesh: {CPU_CHUNK_RULE}" if backend == "cpu"
                                else None)),
         "sequential_passes": sequential,
         "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "mge_step_wu_closed_form": float(wu.mge_step_closed_form(config.base_batch,
                                                                  config.levels))}
  # The host's speed at the start and the end of the run: on a VM, memory-bound and
  # compute-bound programs slow down separately from hour to hour.
  speed_sizes = HOST_SPEED_SIZES.get(config.name if config.name == "smoke" else backend, {})
  out["host_speed"] = {"start": host_speed(**speed_sizes)}
  md = [f"Benchmark on {out['device']} (backend {backend}, jax {jax.__version__}); "
        f"config {config.name}; compute dtype {config.compute_dtype}; "
        f"{config.conv_algorithm} 3x3 convs (--conv-algorithm); model passes "
        f"{'one after another' if sequential else 'side by side'} (--sequential); "
        f"medians of {config.repeats} timed calls after warm-up."]
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)

  def save_section(name, value):  # after every row: an interrupted run keeps what it measured
    out[name] = value
    (workdir / "benchmark.json").write_text(json.dumps(out, indent=2))

  def save(rows):
    save_section("steps", rows)

  def twin(sizes, on_row=lambda rows: None):
    return bench_torch(sizes, config.repeats, args.torch_twin, progress,
                       same_samples=not args.skip_same_samples, on_row=on_row)

  bracket = args.torch_bracket and "steps" in args.sections and "torch" in args.sections
  if "steps" in args.sections:
    rows, torch_rows, torch_skipped = [], [], None
    for sizes in ([(s,) for s in config.sizes] if bracket else [config.sizes]):
      before = twin(sizes) if bracket else None
      done = list(rows)
      rows += bench_steps(dataclasses.replace(config, sizes=sizes), chunk_for, tuple(args.mge),
                          progress, on_row=lambda new: save(done + new),
                          same_samples=not args.skip_same_samples,
                          accumulate_same=args.same_samples_accumulate,
                          sequential=sequential, split_step=args.split_step,
                          split_single=args.split_single,
                          settle=args.settle)
      if bracket and "skipped" in before:
        torch_skipped = before
      elif bracket:
        torch_rows += bracket_torch_rows(before["rows"], twin(sizes)["rows"])
        save_section("torch", {"twin": str(args.torch_twin), "bracketed": True,
                               "rows": torch_rows})
    out["steps"] = rows
    md += ["", steps_table(out["steps"])]
    if bracket:
      out["torch"] = torch_skipped or {"twin": str(args.torch_twin), "bracketed": True,
                                       "rows": torch_rows}
  if "torch" in args.sections:
    if not bracket:
      out["torch"] = twin(config.sizes, lambda rows: save_section("torch", {"rows": rows}))
    md += ["", "PyTorch twin of the ResNet (same process run, 4 levels, batches 16..128"
           + ("; at each size the mean of a run just before and one just after JAX's steps)"
              if bracket else ")"), "", torch_table(out["torch"], out.get("steps", []))]
  if "time-to-mse" in args.sections:
    ttm_config = DENOISE_CONFIGS[args.ttm_config or config.denoise_config]
    out["time_to_mse"] = bench_time_to_mse(
        ttm_config.name, args.ttm_model, args.ttm_data_dir,
        tuple(args.ttm_scales),
        args.ttm_eval_every, workdir / "time_to_mse", chunk_for(ttm_config.size), progress,
        sequential,
        config.conv_algorithm,
        resolve_split_step(args.ttm_split_step,
                           finest_pass_pixels=ttm_config.base_batch * ttm_config.size ** 2))
    md += ["", "Full-Multiscale vs single-scale: wall time to single-scale's final "
           "validation MSE", "", time_to_mse_table(out["time_to_mse"])]
  if "loss-eval" in args.sections:
    out["loss_eval"] = bench_loss_eval(config, args.loss_eval_model,
                                       args.loss_eval_chunk_pixels, progress)
    md += ["", loss_eval_table(out["loss_eval"], args.loss_eval_model)]
  if "pipeline" in args.sections:
    steps = args.pipeline_steps or (200 if backend == "gpu" else 20)
    out["pipeline"] = bench_pipeline(config.denoise_config, args.ttm_model, args.ttm_data_dir,
                                     steps, chunk_for(DENOISE_CONFIGS[config.denoise_config].size),
                                     backend == "gpu", progress, sequential,
                                     config.conv_algorithm)
    md += ["", pipeline_table(out["pipeline"])]
  if "first-step" in args.sections:
    mode = "by-mesh" if "by-mesh" in args.mge else args.mge[0]
    out["first_step"] = bench_first_step(config, mode, args.device,
                                         workdir / "first_step_cache", progress, sequential,
                                         tuple(args.first_step_runs), args.init_platform,
                                         args.split_step)
    md += ["", "Time to the first training step of a fresh process (cold: empty caches; "
           "warm: a second run, with JAX's persistent compilation cache alone and with "
           "mgtrain's step cache too)", "", first_step_table(out["first_step"])]
  if "mfc" in args.sections:
    out["mfc"] = bench_mfc(config, progress, args.settle)
    md += ["", f"Mesh-free conv vs 3x3 conv, batch {config.mfc_batch}", "",
           mfc_table(out["mfc"])]
  out["host_speed"]["end"] = host_speed(**speed_sizes)
  md.insert(1, "Host speed (`experiments.host_speed`), start / end of the run: "
            + describe_host_speed(out["host_speed"]["start"], out["host_speed"]["end"]) + ".")
  (workdir / "benchmark.json").write_text(json.dumps(out, indent=2))
  figures = benchmark_plots.write_figures(out, workdir / "benchmark")
  if figures:
    md += ["", "Figures: " + ", ".join(f"`{f.name}`" for f in figures)]
  text = "\n".join(md) + "\n"
  (workdir / "benchmark.md").write_text(text)
  print(text)
  return out


if __name__ == "__main__":
  main()
