"""Time to the first training step of a fresh process (issue 8: compile time).

What a user waits for before training starts: Python and jax imports, the
model's initialisation, tracing and lowering the step, XLA compilation (or
loading it from JAX's persistent compilation cache), and the first step
itself. With ``--step-cache`` the compiled step is looked up in a
:class:`mgtrain.step_cache.StepCache` first; a hit skips tracing, lowering
and compiling (``trace_and_lower`` is then 0 and ``compile`` is the load).
``--split-step`` builds the MGE step as one program per model pass
(:class:`mgtrain.split_step.SplitStep`), loaded or compiled side by side.

The step is the benchmark's denoising train step
(:func:`experiments.benchmark.stage_program`): a ``--levels``-level MGE step
with batches ``N0, 2 N0, ...``, or single-scale batch ``N0`` with
``--mge single``.

Prints one JSON line with each phase in seconds (``state`` builds and
places the train state), ``params_sha256`` (the initial parameters' bytes,
to compare runs under different flags), ``xla_flags``, ``since_start`` (from this
module's first line, after the interpreter and any re-exec of
:mod:`experiments.runtime`) and the cache directory used.
``python -m experiments.benchmark --sections first-step`` runs this three
times in fresh processes: empty caches, a warm compilation cache, and a warm
step cache too. The step cache's load and store are done by hand here (not
``StepCache.compile``) so that tracing and compiling are timed apart.

Usage::

  python -m experiments.first_step --model unet --size 64 --compile-cache /tmp/cache
  python -m experiments.first_step --model unet --compile-cache /tmp/cache --step-cache /tmp/steps
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from experiments import runtime  # noqa: E402,F401  (process set-up before jax)
from experiments.cli import nonnegative_int, positive_int  # noqa: E402


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m experiments.first_step", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="unet")
  p.add_argument("--size", type=positive_int, default=64)
  p.add_argument("--levels", type=positive_int, default=4)
  p.add_argument("--base-batch", type=positive_int, default=16)
  p.add_argument("--mge", choices=("by-mesh", "terms", "single"), default="by-mesh")
  p.add_argument("--split-step", action="store_true",
                 help="the MGE step as one program per model pass (mgtrain.split_step), "
                      "loaded or compiled side by side")
  p.add_argument("--chunk-pixels", type=nonnegative_int, default=0, help="0: no chunking")
  # Not experiments.denoise.add_sequential_argument: importing denoise here
  # would import jax before the "imports" phase is timed.
  p.add_argument("--sequential", choices=("auto", "on", "off"), default="auto",
                 help="model passes one after another (auto: on on CPU), as in "
                      "experiments.denoise")
  p.add_argument("--conv-algorithm", choices=("auto", "direct", "winograd"), default="auto",
                 help="how the standard 3x3 convs are computed (auto: winograd on CPU); "
                      "see mgtrain.nn.convs")
  p.add_argument("--device", choices=("cpu", "gpu"), default=None)
  p.add_argument("--init-platform", default=None,
                 help="initialise the model on this platform (e.g. cpu) and put the "
                      "parameters on the device (default: on the device); see "
                      "mgtrain.nn.init_params")
  p.add_argument("--compile-cache", default="",
                 help="persistent compilation cache directory ('' = none: a cold compile)")
  p.add_argument("--step-cache", default="",
                 help="mgtrain.step_cache directory ('' = none): a hit skips tracing too")
  args = p.parse_args(argv)

  runtime.use_device(args.device)
  import jax
  runtime.enable_compilation_cache(args.compile_cache)
  import jax.numpy as jnp
  import numpy as np

  from experiments.benchmark import BENCH_MODELS, _bench_model, check_model_hierarchy, \
      stage_program
  from experiments.denoise import make_loss_fn, resolve_sequential
  from mgtrain import full_multiscale as fm
  from mgtrain.hierarchy import Hierarchy
  from mgtrain.nn import init_params
  from mgtrain.nn.convs import resolve_conv_algorithm
  if args.model not in BENCH_MODELS:
    raise SystemExit(f"unknown model {args.model!r}; choose from {BENCH_MODELS}")

  phases = {"imports": time.perf_counter() - _T_START}
  step_cache = runtime.step_cache(args.step_cache)
  t = time.perf_counter()
  conv_algorithm = resolve_conv_algorithm(args.conv_algorithm)
  model = _bench_model(args.model, conv_algorithm=conv_algorithm)
  size = args.size
  check_model_hierarchy("--model / --size / --levels / --base-batch", [args.model], args.levels,
                        size, args.base_batch)
  hierarchy = Hierarchy(levels=args.levels, size=size, base_batch=args.base_batch,
                        restriction="nearest")
  params = init_params(model, jax.random.key(0), jnp.zeros((1, size, size, 3)),
                       jnp.zeros((1,)), step_cache=step_cache, on_platform=args.init_platform)
  jax.block_until_ready(params)
  # A real run device_puts its photographs; drawing the pool with jax.random
  # would add a compilation a real run does not have.
  pool = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (64, size, size, 3)), jnp.float32)
  phases["init"] = time.perf_counter() - t
  # Identifies the initial parameters bit for bit, so that runs under other
  # XLA or JAX flags show whether they changed them. Outside the timed
  # phases: it copies the parameters to the host.
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    digest.update(np.asarray(leaf).tobytes())

  stage = (fm.Stage((0,), (args.base_batch,), 1) if args.mge == "single"
           else fm.multiscale_schedule(hierarchy, 1)[0])
  t = time.perf_counter()
  sequential = resolve_sequential(args.sequential)
  split = args.split_step
  jitted, state = stage_program(stage, hierarchy, make_loss_fn(model), params,
                                args.chunk_pixels or None,
                                fuse_meshes=args.mge == "by-mesh",
                                step_cache=step_cache,
                                cache_key=f"model={args.model} conv={conv_algorithm}",
                                sequential=sequential, split_step=split)
  jax.block_until_ready(state)
  phases["state"] = time.perf_counter() - t
  hit = None
  key = (f"experiments.first_step model={args.model} conv={conv_algorithm} "
         f"mge={args.mge} chunk={args.chunk_pixels} "
         f"sequential={sequential} {stage!r} {hierarchy!r}")
  if split:
    # SplitStep.compile loads, traces and compiles its programs in phases of
    # its own (loads and compiles side by side); its figures are those phases.
    compiled = jitted.compile(state, pool, step_cache=step_cache, key=key)
    hit = None if step_cache is None else all(compiled.hits.values())
    phases["trace_and_lower"] = compiled.lower_seconds
    phases["compile"] = compiled.compile_seconds
  elif step_cache is not None:
    t = time.perf_counter()
    compiled = step_cache.load(key, state, pool)
    hit = compiled is not None
    if hit:
      phases["trace_and_lower"] = 0.0
      phases["compile"] = time.perf_counter() - t
  if not hit and not split:
    t = time.perf_counter()
    lowered = jitted.lower(state, pool)
    phases["trace_and_lower"] = time.perf_counter() - t
    t = time.perf_counter()
    if step_cache is None:
      compiled = lowered.compile()
    else:
      compiled = step_cache.compile_and_store(lowered, key, state, pool)
    phases["compile"] = time.perf_counter() - t
  t = time.perf_counter()
  state, metrics = compiled(state, pool)
  jax.block_until_ready(metrics["loss"])
  phases["first_step"] = time.perf_counter() - t
  out = {"model": args.model, "size": size, "levels": args.levels, "mge": args.mge,
         "split_step": split,
         "sequential": sequential,
         "backend": jax.default_backend(), "compile_cache": args.compile_cache or None,
         "step_cache": None if step_cache is None else ("hit" if hit else "miss"),
         "init_platform": args.init_platform,
         "params_sha256": digest.hexdigest(), "conv_algorithm": conv_algorithm,
         # Flags change the program and its load time (YNNPACK thunks load slowly).
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "phases": phases,
         "before_first_step": sum(v for k, v in phases.items() if k != "first_step"),
         "since_start": time.perf_counter() - _T_START}
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
