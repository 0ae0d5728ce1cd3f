"""Denoising with single-scale, Multiscale (MGE) and Full-Multiscale training.

The task of the MGE paper, Section 4: ``u = t y + (1 - t) z`` with
``z ~ N(0, I)`` and ``t ~ U[0, 1]`` given to the network, loss
``1/2 E ||f(u, t; theta) - y||^2`` (reported as per-pixel MSE), on random
patches of real photographs, with the reference ResNet (597,699 parameters).

Usage::

  python -m experiments.denoise --config cpu --strategy all --workdir runs/denoise
  python -m experiments.denoise --config smoke --strategy multiscale --workdir /tmp/d
  python -m experiments.denoise --config cpu --data-dir ../shared/data/CBSD68 --workdir runs/cbsd
  python -m experiments.denoise --config paper --dataset stl10 --download --workdir runs/stl10

Each strategy writes ``WORKDIR/results.json`` (``WORKDIR/<strategy>/`` with
``--strategy all``), a loss-vs-#WU PNG and orbax checkpoints; rerunning with
the same ``--workdir`` resumes from the latest checkpoint. Each workdir
records in ``run.json`` what fixes its run (config values, strategy, model,
levels, restriction, dtype, data, MGE form: :func:`run_signature`); a rerun
that differs in any of them stops with a message naming the difference,
instead of resuming another run's checkpoints. ``--strategy all`` also
writes ``summary.json``, ``summary.md`` and ``val_mse_vs_wu.png`` and prints
the comparison table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

from experiments import runtime  # noqa: F401  (sets XLA_FLAGS before jax)

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.cli import nonnegative_int, positive_float, positive_int
from experiments.configs import CONFIGS, DenoiseConfig, get_config
from mgtrain import full_multiscale as fm
from mgtrain import metrics
from mgtrain import parallel
from mgtrain.checkpoint import Checkpointer
from mgtrain.data import patches, sources, tasks
from mgtrain.hierarchy import RESTRICTIONS, SUBSAMPLE_MODES, Hierarchy, HierarchyError
from mgtrain.nn import init_params
from mgtrain.nn.convs import CONV_ALGORITHMS, get_conv, resolve_conv_algorithm
from mgtrain.nn.resnet import ResNet, count_params
from mgtrain.sampling import coarse_sampler

# Every spatial conv of the ResNet comes from this factory (mgtrain.nn.convs).
MODEL_CONVS = {"resnet": "standard", "mfc-resnet": "mfc",
               "mfc-pairwise-resnet": "mfc-pairwise"}
MODELS = tuple(MODEL_CONVS)
# On CPU, big batches are evaluated in chunks of at most this many samples x
# pixels (64 x 64^2, 16 x 128^2, 4 x 256^2), one after another (a rolled
# loop, or the split step's chunk program: uncapped; chunks run side by
# side are unrolled, at most mgtrain.mge.MAX_CHUNKS of them). With XLA's
# own convolutions (experiments.runtime turns YNNPACK off) the reference
# ResNet's single b240 step at 64^2 took 43.7 s unchunked, 35.4 s in chunks
# of 2^18 and 37.1 s in chunks of 2^16; the MGE step's batches (at most
# 16 x 64^2) stay whole: chunks of 8 x 32^2, the old default (for YNNPACK),
# made that step slower, 6.07 s vs 4.78 s. Hierarchies whose finest mesh is
# CPU_FINE_MESH_SIZE or more use CPU_FINE_MESH_CHUNK_PIXELS instead; see
# default_chunk_pixels.
CPU_CHUNK_PIXELS = 2**18
CPU_FINE_MESH_SIZE = 128
CPU_FINE_MESH_CHUNK_PIXELS = 2**14
# The rule of default_chunk_pixels in words, for help texts and results files.
CPU_CHUNK_RULE = (f"{CPU_FINE_MESH_CHUNK_PIXELS} from {CPU_FINE_MESH_SIZE}^2 up, "
                  f"{CPU_CHUNK_PIXELS} below")


def default_chunk_pixels(backend: str, finest_size: int) -> int | None:
  """The chunk size (``max_pixels_per_chunk``) a run uses by default.

  Off (``None``) on a GPU, where a batch runs whole. On CPU the rule is by
  the hierarchy's finest mesh, ``finest_size`` (the image side S):

  * ``S >= CPU_FINE_MESH_SIZE`` (128): chunks of at most 2^14 samples x
    pixels, i.e. 1 image at 128^2, 4 at 64^2, 16 at 32^2. Every level of
    the hierarchy uses it, so an MGE step at 256^2 cuts its 64^2 pass too.
  * below: chunks of at most 2^18 (``CPU_CHUNK_PIXELS``), which leaves the
    MGE step's batches at 64^2 and coarser whole.

  Why (docs/benchmark_cpu.md, 2026-12-06, each step alone in its own
  process; time at 2^14 / time at 2^18): ResNet at 128^2 b16 0.86, MGE
  0.70-0.88, b240 0.90-0.96; at 256^2 b16 0.75-0.97, MGE 0.91-0.95; UNet
  at 256^2 b16 0.70, MGE 0.82; at 128^2 0.95 / 0.93; MFC ResNet at 128^2
  0.79 / 0.87. Below 128^2 small chunks gain nothing (ResNet 64^2
  0.89-1.10) or cost: the UNet's b16 step at 64^2 took 1.25x as long.
  The benchmark's 128^2 rows, the two sizes in the same hour (b16 / MGE /
  b240): ResNet 0.73 / 0.83 / 0.79, UNet 0.78 / 0.97 / 0.86, working
  memory a tenth. Single-scale gains as much or more, so the ratio b240 /
  MGE does not rise (UNet 128^2: 6.12x against 6.91x): the rule follows
  the step times, not the ratio.

  >>> default_chunk_pixels("cpu", 64), default_chunk_pixels("cpu", 256)
  (262144, 16384)
  >>> default_chunk_pixels("gpu", 256) is None
  True
  """
  if finest_size < 1:
    raise ValueError(f"finest_size must be a positive image side, got {finest_size}")
  if backend != "cpu":
    return None
  return CPU_FINE_MESH_CHUNK_PIXELS if finest_size >= CPU_FINE_MESH_SIZE else CPU_CHUNK_PIXELS


def resolve_chunk_pixels(choice: int | None, backend: str, finest_size: int) -> int | None:
  """``--chunk-pixels`` as ``max_pixels_per_chunk``: ``None`` (not given)
  takes :func:`default_chunk_pixels`, 0 turns chunking off.

  >>> resolve_chunk_pixels(None, "cpu", 256), resolve_chunk_pixels(0, "cpu", 256)
  (16384, None)
  """
  if choice is None:
    return default_chunk_pixels(backend, finest_size)
  return choice or None


# ---------------------------------------------------------------- data
@dataclasses.dataclass
class DenoiseData:
  pool: jax.Array          # (M, S, S, 3) training patches, model range
  val: dict                # fixed validation batch: u, t, y (numpy)
  description: str


def load_data(config: DenoiseConfig, dataset: str, data_dir: str | None,
              download: bool, max_images: int | None = None) -> DenoiseData:
  """Training patch pool and fixed validation set, split by image."""
  if dataset == "folder" and not data_dir:
    raise SystemExit("--dataset folder needs --data-dir DIR")
  if dataset in ("bundled", "folder"):
    images = sources.load_images(dataset, data_dir=data_dir, max_images=max_images)
    train_images, val_images = sources.train_val_split(images, val_fraction=0.2)
    desc = (f"{dataset}:{data_dir}" if dataset == "folder" else "bundled:skimage.data")
  else:
    train_images = sources.load_images(dataset, data_dir=data_dir, download=download,
                                       split="train", max_images=max_images)
    val_images = sources.load_images(dataset, data_dir=data_dir, download=download,
                                     split="test", max_images=max(config.val_count, 1))
    desc = f"tfds:{dataset}"
  pool = patches.extract_patches(train_images, config.size, config.pool_size, config.seed)
  val_y = patches.extract_patches(val_images, config.size, config.val_count,
                                  config.seed + 1)
  val = tasks.fixed_denoise_set(patches.to_model_range(val_y), config.seed + 2)
  desc += f" ({len(train_images)} train / {len(val_images)} validation images)"
  return DenoiseData(jnp.asarray(patches.to_model_range(pool)), val, desc)


@coarse_sampler
def sample_denoise_batch(pool: jax.Array, key: jax.Array, n: int, *,
                         hierarchy: Hierarchy | None = None, level: int = 0) -> dict:
  """``n`` fresh samples: random patches, flips, noise, t.

  On the finest mesh by default. With ``level`` (and a coarsening
  ``hierarchy``) the samples come directly on mesh ``level``: the clean
  patches are restricted there and the noise is drawn there with the
  standard deviation restricted white noise has
  (:meth:`~mgtrain.hierarchy.Hierarchy.white_noise_scale`). That is equal in
  law to restricting the finest-mesh samples, at a fraction of the random
  numbers (see :mod:`mgtrain.sampling`).
  """
  k_idx, k_flip, k_task = jax.random.split(key, 3)
  y = pool[jax.random.randint(k_idx, (n,), 0, pool.shape[0])]
  flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
  y = jnp.where(flip, y[:, :, ::-1, :], y)
  if not level:
    return tasks.denoise(k_task, y)
  if hierarchy is None or hierarchy.subsample != "coarsen":
    raise ValueError("sampling on a coarser level needs a hierarchy that only coarsens")
  return tasks.denoise(k_task, hierarchy.restrict(y, level),
                       noise_scale=hierarchy.white_noise_scale(level))


# ---------------------------------------------------------------- model
# --compute-dtype: the models' Flax compute dtype (parameters stay float32).
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  """The model ``dtype`` for ``--compute-dtype name`` (``None`` for float32)."""
  try:
    return COMPUTE_DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown compute dtype {name!r}; choose from "
                     f"{sorted(COMPUTE_DTYPES)}") from None


def build_model(name: str, dtype: str = "float32", conv_algorithm: str = "auto"):
  """The reference ResNet with the conv factory of ``name`` (see ``MODEL_CONVS``).

  ``mfc-resnet`` uses one heat-equation filter per channel (76,995 params);
  ``mfc-pairwise-resnet`` one per channel pair, the paper's MFC-ResNet
  (532,163 params, MFC paper Table 13). ``dtype`` is the compute dtype
  (``'bfloat16'``: convs and activations in bfloat16, float32 parameters and
  updates; see :class:`mgtrain.nn.resnet.ResNet`).
  """
  if name not in MODEL_CONVS:
    raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
  return ResNet(conv=model_conv(MODEL_CONVS[name], conv_algorithm), dtype=compute_dtype(dtype))


def model_conv(conv_name: str, conv_algorithm: str = "auto"):
  """The conv factory ``conv_name``; standard convs computed by ``conv_algorithm``
  (``'direct'``, ``'winograd'`` or ``'auto'``, see :mod:`mgtrain.nn.convs`)."""
  if conv_name == "standard":
    return get_conv(conv_name, algorithm=conv_algorithm)
  return get_conv(conv_name)


def add_conv_algorithm_argument(parser, nargs=None) -> None:
  """``--conv-algorithm auto|direct|winograd`` (the standard 3x3 convs)."""
  parser.add_argument(
      "--conv-algorithm", default=["auto"] if nargs else "auto", nargs=nargs,
      choices=CONV_ALGORITHMS,
      help="how the standard 3x3 convs are computed: winograd (F(4x4, 3x3), about 2x "
           "faster fwd+bwd for wide layers on CPU, within 1e-5 of direct), direct "
           "(XLA's convolution) or auto (winograd on CPU, direct elsewhere); the "
           "parameters are the same either way")


def make_loss_fn(model):
  """Per-sample MSE of ``model``'s prediction, in float32 whatever the compute dtype."""
  def loss_fn(params, batch):
    pred = model.apply(params, batch["u"], batch["t"]).astype(jnp.float32)
    return jnp.mean(jnp.square(pred - batch["y"]), axis=(1, 2, 3))
  return loss_fn


def make_optimizer_factory(config: DenoiseConfig, first_stage_iterations: int):
  """Adam with a cosine schedule per stage.

  A Full-Multiscale stage with ``I_s`` iterations starts from the peak rate
  ``lr * I_s / I_0`` (``I_0``: the first, coarsest stage's iterations), so a
  finer stage, which starts near its solution (Theorem 1) and runs fewer
  iterations, also takes proportionally smaller steps. Single-scale and
  Multiscale have one stage and use ``lr``. Measured on the cpu config with
  CBSD68 (nearest restriction), Full-Multiscale final validation MSE: 0.0682
  with a fresh Adam at the full rate per stage, 0.0690 with Adam carried at
  the full rate, 0.0612 with Adam carried and the scaled rate.
  """
  def make(iterations: int):
    peak = config.learning_rate * min(1.0, iterations / first_stage_iterations)
    if config.cosine:
      lr = optax.cosine_decay_schedule(peak, iterations)
    else:
      lr = peak
    # inject_hyperparams: a Full-Multiscale stage can keep Adam's moments and
    # restart only the schedule (mgtrain.full_multiscale.carry_inner_state).
    return optax.inject_hyperparams(optax.adam)(learning_rate=lr)
  return make


# The choices of the --sequential and --compile-ahead flags.
AUTO_CHOICES = ("auto", "on", "off")


def add_sequential_argument(parser) -> None:
  """``--sequential auto|on|off``, shared by the CLIs that build train steps."""
  parser.add_argument(
      "--sequential", choices=AUTO_CHOICES, default="auto",
      help="run a step's model passes (MGE meshes or terms, chunks) one after another, so "
           "it plans the largest pass's memory instead of the sum (same values; the "
           "4-level MGE step's memory halves on CPU, and it ran 0.90-0.92x the time there). "
           "auto: on on CPU, off elsewhere (on an H200 it ran 1.02-1.03x the time)")


def resolve_sequential(choice: str) -> bool:
  """``--sequential auto|on|off``: auto is on for the CPU backend only.

  On CPU, running the passes one after another halves the 4-level MGE
  step's planned memory at the same step time (``mgtrain.mge``). On an H200
  the ResNet's MGE step ran 1.02-1.03x slower sequenced (it takes away XLA's
  freedom to interleave the small coarse-mesh kernels), so auto leaves it
  off there.
  """
  return _resolve_auto("sequential", choice, auto=jax.default_backend() == "cpu")


def resolve_compile_ahead(choice: str) -> bool:
  """``--compile-ahead auto|on|off``: auto is on off the CPU backend.

  On an accelerator the next stage's compile runs on an otherwise idle host
  while the device trains. On a 2-core CPU the two share the cores: a
  ``cpu4`` Full-Multiscale run took 2-8% longer with it (docs/benchmark_cpu.md).
  """
  return _resolve_auto("compile-ahead", choice, auto=jax.default_backend() != "cpu")


# --split-step auto: the largest finest-mesh MGE pass (N_0 x size^2 samples x
# pixels) for which the split step is on (see resolve_split_step).
SPLIT_STEP_AUTO_MAX_PIXELS = 2 ** 17


def resolve_split_step(choice: str, one_device: bool = True,
                       finest_pass_pixels: int | None = None) -> bool:
  """``--split-step auto|on|off``: auto is on for the CPU backend on one
  device, where the finest MGE pass holds at most
  :data:`SPLIT_STEP_AUTO_MAX_PIXELS` samples x pixels (``N_0 x size^2``;
  ``None``: not checked).

  One program per model pass (:mod:`mgtrain.split_step`) gives the same
  updates. On the 2-core CPU (2026-12-05) it cut the ``cpu`` config's run
  from 230.5 to 200.9 s (Multiscale 52.0 -> 39.7 s, Full-Multiscale
  53.7 -> 45.5 s, compiles included; the same validation MSEs; the MGE
  steps' train time 34.6 -> 27.9 s), left the UNet's MGE step at 64^2 as
  fast as one program (2.03 against 2.08 s by term, each alone), and a
  warm start of that step by mesh 10.4-10.9 s -> 3.7-3.9 s (by term
  5.0-5.5 s split). It has not run on a GPU,
  where one program per step is what beats the PyTorch reference, so auto
  leaves it off there. It needs one device (not ``--devices``,
  ``--distributed`` or ``--level-parallel``).

  Why the size limit: each program call allocates its working memory
  afresh, and on this CPU host (a VM whose fresh pages fault on the host)
  that costs more the bigger the passes. The UNet's MGE step by mesh at
  128^2 (finest pass 16 x 128^2 = 2^18), separate processes on 2026-12-05:
  2.24 b16 steps as one program, 3.93 split, and 2.07 split with glibc
  keeping freed memory (``experiments.runtime``'s heap-reuse tunables);
  the ResNet's at 128^2 2.49 split against 2.28-2.31. At 64^2 (2^16) the
  split UNet step was as fast as one program.
  """
  small = finest_pass_pixels is None or finest_pass_pixels <= SPLIT_STEP_AUTO_MAX_PIXELS
  return _resolve_auto("split-step", choice,
                       auto=jax.default_backend() == "cpu" and one_device and small)


def _resolve_auto(flag: str, choice: str, auto: bool) -> bool:
  """``--FLAG auto|on|off`` as a bool, ``auto`` giving ``auto``."""
  if choice not in AUTO_CHOICES:
    raise ValueError(f"--{flag} is auto, on or off, not {choice!r}")
  return auto if choice == "auto" else choice == "on"


# ---------------------------------------------------------------- one run
class WorkdirMismatch(ValueError):
  """A workdir's checkpoints belong to another run (see :func:`run_signature`)."""


def run_signature(config: DenoiseConfig, strategy: str, *, model_name: str, levels: int,
                  subsample: str, restriction: str, dtype: str, data_description: str,
                  fuse_meshes: bool) -> dict:
  """What fixes a run's trajectory, as ``results.json`` records it.

  A checkpoint or a finished result is this run's only if every entry is
  equal. Left out are the choices that give the same updates (to float
  rounding): the conv algorithm, chunking, passes in sequence, the split
  step, devices and compile settings. ``mge`` is in: the optimizer state of
  ``terms`` (with per-level statistics) and ``by-mesh`` differ.
  """
  return {"config_values": dataclasses.asdict(config), "strategy": strategy,
          "model": model_name, "levels": levels, "subsample": subsample,
          "restriction": restriction if subsample != "crop" else None,
          "compute_dtype": dtype, "data": data_description,
          "mge": "by-mesh" if fuse_meshes else "terms"}


def signature_differences(recorded: dict, signature: dict) -> list[str]:
  """``"key: recorded -> now"`` for each entry of ``signature`` that differs
  (``config_values`` entry by entry)."""
  out = []
  for key, now in signature.items():
    was = recorded.get(key)
    if key == "config_values" and isinstance(was, dict):
      out += [f"{k}: {was.get(k)!r} -> {v!r}" for k, v in now.items() if was.get(k) != v]
    elif was != now:
      out.append(f"{key}: {was!r} -> {now!r}")
  return out


def check_workdir(workdir: Path, signature: dict, has_checkpoints: bool) -> None:
  """Refuses to resume checkpoints written by another run; records this run's
  signature in ``WORKDIR/run.json``.

  Raises :class:`WorkdirMismatch` naming what differs. Checkpoints without a
  ``run.json`` (written before it existed) are resumed as they always were.
  """
  record = workdir / "run.json"
  if has_checkpoints and record.exists():
    try:
      recorded = json.loads(record.read_text())
    except ValueError:
      raise WorkdirMismatch(f"{record} cannot be read, so the checkpoints beside it cannot "
                            "be matched to this run; pass another --workdir, or delete "
                            "that one to start afresh") from None
    differences = signature_differences(recorded, signature)
    if differences:
      raise WorkdirMismatch(
          f"{workdir} holds checkpoints of another run ({'; '.join(differences)}); "
          "pass another --workdir, or delete that one to start afresh")
  if jax.process_index() == 0:
    tmp = record.with_suffix(".json.tmp")   # a run killed mid-write leaves the old record
    tmp.write_text(json.dumps(signature, indent=1))
    os.replace(tmp, record)


def run_strategy(config: DenoiseConfig, strategy: str, workdir: Path, *, data: DenoiseData,
                 model_name: str = "resnet", levels: int | None = None,
                 subsample: str = "coarsen", restriction: str = "nearest",
                 progress: bool = True, stop_after: int | None = None,
                 chunk_pixels: int | None = None, fuse_meshes: bool = False,
                 mesh=None, level_parallel=None, step_cache=None,
                 dtype: str = "float32", sequential: bool = False,
                 compile_ahead: bool = False, conv_algorithm: str = "auto",
                 split_step: bool = False, stop_requested=None) -> dict:
  """Trains one strategy into ``workdir`` (resuming if possible); returns its results.

  ``step_cache``: an optional :class:`mgtrain.step_cache.StepCache` for the
  stages' compiled steps, keyed by the model name, its compute ``dtype``,
  ``config`` and the hierarchy (everything the step closes over besides its
  arguments). ``sequential``: model passes one after another
  (:func:`mgtrain.full_multiscale.train`), a memory lever. ``compile_ahead``:
  compile each next stage's step in the background while a stage trains.
  ``conv_algorithm``: how the standard 3x3 convs are computed
  (:func:`mgtrain.nn.convs.resolve_conv_algorithm`; same parameters).
  ``split_step``: each stage's step as one program per model pass
  (:class:`mgtrain.split_step.SplitStep`). ``stop_requested``: an event
  that stops the run after the step in flight, with a checkpoint
  (:func:`mgtrain.full_multiscale.train`). A finished ``results.json`` of
  the same run (:func:`run_signature`) is returned as it is, unless
  ``stop_after`` is set. Raises :class:`WorkdirMismatch`, before anything
  compiles, if ``workdir`` holds checkpoints of another run
  (:func:`check_workdir`).
  """
  conv_algorithm = resolve_conv_algorithm(conv_algorithm)
  workdir.mkdir(parents=True, exist_ok=True)
  levels = config.levels if levels is None else levels
  hierarchy = Hierarchy(levels=levels, size=config.size, base_batch=config.base_batch,
                        batch_growth=config.batch_growth, subsample=subsample,
                        restriction=restriction)
  stages = fm.make_schedule(strategy, hierarchy, config.iterations,
                            config.fms_iterations(levels))
  signature = run_signature(config, strategy, model_name=model_name, levels=levels,
                            subsample=subsample, restriction=restriction, dtype=dtype,
                            data_description=data.description, fuse_meshes=fuse_meshes)
  done = workdir / "results.json"
  if done.exists() and stop_after is None:
    previous = json.loads(done.read_text())
    if previous.get("status") == "complete" and not signature_differences(previous, signature):
      print(f"{strategy}: already complete in {workdir}, reusing its results", file=sys.stderr)
      return previous
  ckpt = Checkpointer(workdir / "checkpoints", every=config.checkpoint_every)
  resumed_from = ckpt.latest_step()
  try:
    check_workdir(workdir, signature, has_checkpoints=resumed_from is not None)
  except WorkdirMismatch:
    ckpt.close()
    raise
  if resumed_from is not None:
    print(f"{strategy}: resuming from the checkpoint at step {resumed_from} of "
          f"{int(fm.stage_boundaries(stages)[-1])} in {workdir}", file=sys.stderr)
  model = build_model(model_name, dtype, conv_algorithm)
  params = init_params(model, jax.random.PRNGKey(config.seed),
                       jnp.zeros((1, config.size, config.size, 3)), jnp.zeros((1,)),
                       step_cache=step_cache)
  apply_fn = model.apply

  def eval_fn(p):
    out = metrics.evaluate_denoiser(apply_fn, p, data.val)
    return {"mse": out["mse"], "psnr": out["psnr"]}

  t0 = time.perf_counter()
  state, history = fm.train(
      params=params, stages=stages, hierarchy=hierarchy, loss_fn=make_loss_fn(model),
      sample_fn=sample_denoise_batch, data=data.pool,
      make_optimizer=make_optimizer_factory(config, stages[0].iterations), seed=config.seed,
      eval_fn=eval_fn, eval_every=config.eval_every, checkpointer=ckpt,
      progress=progress, description=f"{strategy:>15s}", stop_after=stop_after,
      max_pixels_per_chunk=chunk_pixels, fuse_meshes=fuse_meshes, mesh=mesh,
      level_parallel=level_parallel, step_cache=step_cache, sequential=sequential,
      compile_ahead=compile_ahead, split_step=split_step, stop_requested=stop_requested,
      step_cache_key=(f"experiments.denoise model={model_name} dtype={dtype} "
                      f"conv={conv_algorithm} {config!r}"))
  ckpt.close()
  elapsed = time.perf_counter() - t0
  total_steps = int(fm.stage_boundaries(stages)[-1])
  if int(state.step) < total_steps:
    return {"status": "stopped", "step": int(state.step)}

  final = metrics.evaluate_denoiser(apply_fn, state.params, data.val)
  closed_form = fm.schedule_work_units(stages)
  compile_s = float(sum(history["compile_seconds"]))
  train_s = float(sum(history["train_seconds"]))
  results = {
      "task": "denoise",
      "model": model_name,
      "compute_dtype": dtype,
      "conv_algorithm": conv_algorithm,
      "params": count_params(state.params),
      "strategy": strategy,
      "subsample": subsample,
      "restriction": restriction if subsample != "crop" else None,
      "levels": levels,
      "config": config.name,
      "config_values": dataclasses.asdict(config),
      "data": data.description,
      "size": config.size,
      "batch_sizes": list(hierarchy.batch_sizes),
      "stages": [{"levels": list(s.levels), "batch_sizes": list(s.batch_sizes),
                  "iterations": s.iterations,
                  "work_units_per_step": float(s.work_units_per_step),
                  "compile_seconds": history["compile_seconds"][i],
                  "background_compile_seconds":
                      history.get("background_compile_seconds", [0.0] * len(stages))[i],
                  "train_seconds": history["train_seconds"][i]}
                 for i, s in enumerate(stages)],
      "steps": int(state.step),
      "work_units": float(state.work_units),
      "work_units_closed_form": float(closed_form),
      "wall_seconds": compile_s + train_s,
      "compile_seconds": compile_s,
      "train_seconds": train_s,
      "this_process_seconds": elapsed,
      "resumed_from_step": resumed_from,
      "max_pixels_per_chunk": chunk_pixels,
      "sequential_passes": sequential,
      "compile_ahead": compile_ahead,
      "metrics": {"mse": final["mse"], "psnr": final["psnr"]},
      # The optax transform's running per-level statistics of the last stage
      # (finest level first): E||g_k||^2 and the variance of each MGE term.
      # (None with --mge by-mesh, which does not track them.)
      "level_statistics": {
          "levels": list(stages[-1].levels),
          "sq_norm": None if fuse_meshes else np.asarray(state.opt_state.sq_norm).tolist(),
          "variance": None if fuse_meshes else np.asarray(state.opt_state.variance).tolist()},
      "mge": "by-mesh" if fuse_meshes else "terms",
      "split_step": split_step,
      "devices": (1 if mesh is None else int(mesh.size)) if level_parallel is None
                 else (len(jax.devices()) if level_parallel is True else len(level_parallel)),
      "level_parallel": level_parallel is not None,
      "per_image_mse": np.asarray(final["per_image_mse"]).tolist(),
      "evals": history["evals"],
      "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                      "device": str(jax.devices()[0].device_kind),
                      "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "python": platform.python_version()},
      "status": "complete",
  }
  if jax.process_index() == 0:  # multi-host: one writer (checkpoints are collective)
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    plot_history(history, workdir / "loss_vs_wu.png", title=f"{strategy} ({config.name})")
  return results


def plot_history(history: dict, path: Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  wu = np.asarray(history["work_units"])
  loss = np.asarray(history["loss"])
  if len(loss):
    ax.plot(wu, loss, lw=0.6, alpha=0.4, label="training loss (telescoping estimate)")
    k = max(1, len(loss) // 50)
    if len(loss) > k:
      smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
      ax.plot(wu[k - 1:], smooth, lw=1.2, label=f"training loss, mean of {k}")
  if history["evals"]:
    ax.plot([e["work_units"] for e in history["evals"]],
            [e["mse"] for e in history["evals"]], "o-", label="validation MSE")
  ax.set_xlabel("#WU")
  ax.set_ylabel("MSE")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------- comparison
def summarize(results: dict[str, dict], workdir: Path) -> str:
  """Comparison table (Markdown) of the strategies; writes summary files and a plot."""
  base = results.get("single")
  rows = []
  header = ("| strategy | steps | #WU | #WU / single | closed-form #WU / single | "
            "train s | single / this (train s) | wall s (incl. compile) | val MSE | "
            "MSE / single | PSNR | paired t-test p vs single |")
  rows.append(header)
  rows.append("|" + "---|" * (header.count("|") - 1))
  summary = {}
  for name, r in results.items():
    entry = {k: r[k] for k in ("steps", "work_units", "work_units_closed_form",
                               "train_seconds", "compile_seconds", "wall_seconds")}
    entry.update(mse=r["metrics"]["mse"], psnr=r["metrics"]["psnr"])
    wu_ratio = cf_ratio = speed = mse_ratio = p = None
    if base is not None:
      wu_ratio = r["work_units"] / base["work_units"]
      cf_ratio = r["work_units_closed_form"] / base["work_units_closed_form"]
      speed = base["train_seconds"] / r["train_seconds"]
      mse_ratio = r["metrics"]["mse"] / base["metrics"]["mse"]
      if name != "single":
        _, p = metrics.paired_t_test(r["per_image_mse"], base["per_image_mse"])
    entry.update(wu_ratio=wu_ratio, closed_form_wu_ratio=cf_ratio,
                 wall_speedup=speed, mse_ratio=mse_ratio, t_test_p=p)
    summary[name] = entry
    fmt = lambda x, f: "-" if x is None else format(x, f)
    rows.append(
        f"| {name} | {r['steps']} | {r['work_units']:,.0f} | {fmt(wu_ratio, '.4f')} | "
        f"{fmt(cf_ratio, '.4f')} | {r['train_seconds']:.1f} | {fmt(speed, '.2f')}x | "
        f"{r['wall_seconds']:.1f} | {r['metrics']['mse']:.4f} | {fmt(mse_ratio, '.3f')} | "
        f"{r['metrics']['psnr']:.2f} | {fmt(p, '.3g')} |")
  any_r = next(iter(results.values()))
  head = (f"Denoising, model {any_r['model']} ({any_r['params']:,} params), config "
          f"{any_r['config']}, {any_r['levels']} levels, {any_r['size']}x{any_r['size']} "
          f"patches, subsample {any_r['subsample']}"
          + (f" ({any_r['restriction']} restriction)" if any_r["restriction"] else "")
          + f", data {any_r['data']}, backend {any_r['environment']['backend']}.")
  table = head + "\n\n" + "\n".join(rows) + "\n"
  (workdir / "summary.md").write_text(table)
  (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
  _plot_comparison(results, workdir / "val_mse_vs_wu.png")
  return table


def _plot_comparison(results: dict[str, dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in results.items():
    if r["evals"]:
      ax.plot([e["work_units"] for e in r["evals"]], [e["mse"] for e in r["evals"]],
              "o-", label=name)
  ax.set_xscale("log")
  ax.set_xlabel("#WU (log)")
  ax.set_ylabel("validation MSE")
  ax.set_title("validation MSE vs work units")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------- CLI
def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog="python -m experiments.denoise",
      description="Denoising with single-scale, Multiscale and Full-Multiscale training.")
  p.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
  p.add_argument("--strategy", default="all",
                 choices=list(fm.STRATEGIES) + ["all"])
  p.add_argument("--model", default="resnet", choices=MODELS)
  p.add_argument("--levels", type=positive_int, default=None,
                 help="number of levels L (default: the config's)")
  p.add_argument("--compute-dtype", default="float32", choices=sorted(COMPUTE_DTYPES),
                 help="the model's compute dtype: bfloat16 runs convs and activations "
                      "in bfloat16 with float32 parameters, Adam and loss (for GPUs; "
                      "no faster on this CPU)")
  add_conv_algorithm_argument(p)
  p.add_argument("--subsample", default="coarsen", choices=SUBSAMPLE_MODES)
  p.add_argument("--restriction", default="nearest", choices=RESTRICTIONS,
                 help="restriction operator used when coarsening. Denoising uses "
                      "'nearest' by default, as the reference code does: 2x2 "
                      "averaging halves the noise's standard deviation per level, "
                      "so coarse levels would learn a different (less noisy) task "
                      "(cpu config, CBSD68, fine-mesh validation MSE after "
                      "Full-Multiscale's 8x8 stage: 0.109 'average' vs 0.069 "
                      "'nearest'; Multiscale final: 0.0671 vs 0.0638)")
  p.add_argument("--workdir", default=None,
                 help="output directory (default runs/denoise-CONFIG)")
  p.add_argument("--dataset", default=None,
                 help="'bundled' (skimage photographs, default), 'folder' (needs "
                      "--data-dir) or a tfds name such as stl10 or celeb_a")
  p.add_argument("--data-dir", default=None,
                 help="image folder (e.g. ../shared/data/CBSD68), or tfds data_dir "
                      "with a tfds --dataset")
  p.add_argument("--download", action="store_true",
                 help="let tfds download a named dataset (needs network)")
  p.add_argument("--max-images", type=positive_int, default=None)
  p.add_argument("--iterations", type=positive_int, default=None,
                 help="override single-scale/Multiscale iterations and the "
                      "Full-Multiscale coarsest-stage iterations")
  p.add_argument("--learning-rate", type=positive_float, default=None,
                 help="override the config's Adam learning rate")
  p.add_argument("--base-batch", type=positive_int, default=None,
                 help="override N0, the finest level's batch")
  p.add_argument("--batch-growth", type=positive_int, default=None,
                 help="batch factor per coarser level, N_j = growth^j N0 (config default "
                      "2, as in the reference code; the paper suggests 2 to 4). "
                      "Single-scale uses the same samples, sum_j N_j")
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--compile-cache", default=str(runtime.default_cache_dir()),
                 help="JAX persistent compilation cache directory ('' to disable)")
  p.add_argument("--step-cache", default=str(runtime.default_step_cache_dir()),
                 help="directory of compiled train steps (mgtrain.step_cache), so a "
                      "second run of the same config skips tracing and compiling "
                      "('' to disable; not used with --level-parallel)")
  p.add_argument("--chunk-pixels", type=nonnegative_int, default=None,
                 help="evaluate each level's batch in sub-batches of at most this "
                      "many samples x pixels (same gradient). Default on CPU (faster "
                      f"there), by the finest mesh: {CPU_CHUNK_RULE}; off on GPU; 0 = off")
  add_sequential_argument(p)
  p.add_argument("--mge", choices=("auto", "terms", "by-mesh"), default="auto",
                 help="how a Multiscale step evaluates MGE: 'terms' (one pass per "
                      "term; keeps the per-level variance statistics) or 'by-mesh' "
                      "(one pass per mesh, same estimate; 1.1-1.75x faster on an H100). "
                      "auto: by-mesh on a GPU, terms on CPU")
  p.add_argument("--split-step", choices=AUTO_CHOICES, default="auto",
                 help="compile each step as one program per model pass (per MGE term, or "
                      "per mesh with --mge by-mesh) plus sampling and update "
                      "(mgtrain.split_step): the same updates, shorter compiles and several "
                      "times faster loads from the step cache; on a 2-core CPU the cpu "
                      "config ran 1.15x faster. auto: on on CPU with one device, off "
                      "elsewhere (not yet measured on a GPU)")
  p.add_argument("--devices", type=nonnegative_int, default=None,
                 help="data parallelism over this many devices (0 = all; default 1, "
                      "or all with --level-parallel); every level's batch must divide "
                      "evenly")
  p.add_argument("--level-parallel", action="store_true",
                 help="run each MGE term on its own group of devices, concurrently "
                      "(mgtrain.level_parallel; groups sized by the terms' #WU, at least "
                      "one device per level; with --devices N the first N devices)")
  p.add_argument("--distributed", action="store_true",
                 help="multi-host: call jax.distributed.initialize() first and use "
                      "every host's devices (see --coordinator)")
  p.add_argument("--coordinator", default=None,
                 help="with --distributed: coordinator host:port (default: detect "
                      "from SLURM / MPI / Kubernetes)")
  p.add_argument("--num-processes", type=positive_int, default=None)
  p.add_argument("--process-id", type=nonnegative_int, default=None)
  p.add_argument("--compile-ahead", choices=AUTO_CHOICES, default="auto",
                 help="compile each next Full-Multiscale stage's step in a background "
                      "thread while the current stage trains (same results). auto: on "
                      "where the model runs on an accelerator, whose host is then idle; "
                      "off on CPU, where the compile and the training share the cores "
                      "(2-core CPU, cpu4 config: no gain)")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  one_device = not (args.level_parallel or args.distributed
                    or args.devices not in (None, 1))
  config = get_config(args.config)
  base_batch = args.base_batch if args.base_batch is not None else config.base_batch
  split_step = resolve_split_step(args.split_step, one_device, base_batch * config.size ** 2)
  if args.level_parallel and (args.mge == "by-mesh" or args.distributed):
    raise SystemExit("--level-parallel runs the MGE terms separately: it cannot be "
                     "combined with --mge by-mesh or --distributed")
  if split_step and not one_device:
    raise SystemExit("--split-step on runs on one device: it cannot be combined with "
                     "--devices, --distributed or --level-parallel")
  if args.distributed:
    info = parallel.initialize_distributed(args.coordinator, args.num_processes,
                                           args.process_id)
    print(f"distributed: process {info['process_index']} of {info['process_count']}, "
          f"{info['global_devices']} devices in all", file=sys.stderr)
  if args.devices and args.devices > jax.device_count():
    raise SystemExit(f"--devices {args.devices}: JAX finds {jax.device_count()} "
                     f"{jax.default_backend()} device(s) here")
  runtime.enable_compilation_cache(args.compile_cache)
  overrides = {}
  if args.iterations is not None:
    overrides.update(iterations=args.iterations, fms_coarsest_iterations=args.iterations)
  if args.seed is not None:
    overrides.update(seed=args.seed)
  if args.learning_rate is not None:
    overrides.update(learning_rate=args.learning_rate)
  if args.base_batch is not None:
    overrides.update(base_batch=args.base_batch)
  if args.batch_growth is not None:
    overrides.update(batch_growth=args.batch_growth)
  config = dataclasses.replace(config, **overrides)
  dataset = args.dataset or ("folder" if args.data_dir else "bundled")
  workdir = Path(args.workdir or f"runs/denoise-{config.name}")
  # Validate the hierarchy (and its schedule) before loading data or compiling.
  levels = config.levels if args.levels is None else args.levels
  try:
    h = Hierarchy(levels=levels, size=config.size, base_batch=config.base_batch,
                  batch_growth=config.batch_growth, subsample=args.subsample,
                  restriction=args.restriction)
    h.check_schedule(config.fms_iterations(levels), "Full-Multiscale iterations")
  except HierarchyError as e:
    raise SystemExit(f"--config {config.name} with --levels / --base-batch / "
                     f"--batch-growth / --iterations: {e}") from None

  try:
    data = load_data(config, dataset, args.data_dir, args.download, args.max_images)
  except (OSError, ValueError) as e:   # a missing folder, no images, an unknown name
    raise SystemExit(f"--dataset {dataset}: {e}") from None
  print(f"data: {data.description}; {data.pool.shape[0]} training patches, "
        f"{len(data.val['u'])} validation patches of {config.size}x{config.size}",
        file=sys.stderr)
  chunk_pixels = resolve_chunk_pixels(args.chunk_pixels, jax.default_backend(), h.size)
  sequential = resolve_sequential(args.sequential)
  fuse = args.mge == "by-mesh" or (args.mge == "auto" and jax.default_backend() == "gpu")
  mesh = level_parallel = None
  if args.level_parallel:
    fuse = False
    level_parallel = jax.devices()[:args.devices] if args.devices else True
  elif args.distributed or args.devices not in (None, 1):
    mesh = parallel.data_mesh(None if args.distributed or args.devices == 0 else args.devices)
  step_cache = runtime.step_cache(args.step_cache if level_parallel is None else None)
  strategies = list(fm.STRATEGIES) if args.strategy == "all" else [args.strategy]
  results = {}
  # One process: the first Ctrl-C or SIGTERM stops the run after the step in
  # flight, with a checkpoint. Several: a signal may reach one process only,
  # and saving a checkpoint is collective, so the default handling stays.
  graceful = (runtime.stop_on_signal() if jax.process_count() == 1
              else contextlib.nullcontext())
  with graceful as stop:
    for strategy in strategies:
      out = workdir / strategy if args.strategy == "all" else workdir
      try:
        r = run_strategy(config, strategy, out, data=data, model_name=args.model,
                         levels=levels, subsample=args.subsample,
                         restriction=args.restriction, progress=not args.no_progress,
                         stop_after=args.stop_after, chunk_pixels=chunk_pixels,
                         fuse_meshes=fuse, mesh=mesh, level_parallel=level_parallel,
                         step_cache=step_cache, dtype=args.compute_dtype, sequential=sequential,
                         compile_ahead=resolve_compile_ahead(args.compile_ahead),
                         conv_algorithm=args.conv_algorithm, split_step=split_step,
                         stop_requested=stop)
      except (HierarchyError, WorkdirMismatch) as e:   # e.g. batches not split over --devices
        raise SystemExit(f"{strategy}: {e}") from None
      if r.get("status") != "complete":
        print(f"{strategy}: stopped at step {r['step']} (checkpointed)", file=sys.stderr)
        if stop is not None and stop.is_set():
          raise SystemExit(128 + stop.signum)   # as a shell reports a signal
        return results
      results[strategy] = r
  if jax.process_index() != 0:
    pass  # multi-host: process 0 writes the summary
  elif len(results) > 1:
    print(summarize(results, workdir))
  else:
    summarize(results, workdir)   # summary.md and .json for one strategy too
    r = next(iter(results.values()))
    print(f"{strategy}: {r['steps']} steps, {r['work_units']:,.1f} #WU "
          f"(closed form {r['work_units_closed_form']:,.1f}), "
          f"{r['wall_seconds']:.1f} s, validation MSE {r['metrics']['mse']:.4f}, "
          f"PSNR {r['metrics']['psnr']:.2f} dB -> {out / 'results.json'}")
  return results


if __name__ == "__main__":
  main()
