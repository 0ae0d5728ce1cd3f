"""Where a step's time goes: per-HLO-instruction times from ``jax.profiler``.

Profiles one compiled program with :func:`mgtrain.profiling.profile` and
writes ``WORKDIR/profile.json`` (every instruction) and ``profile.md`` (the
``--top`` instructions and the per-opcode totals). Two kinds of program:

* ``--program step`` (default): the benchmark's denoising train step
  (:func:`experiments.benchmark.stage_program`) of ``--model`` at
  ``--size``: single-scale batch ``N0`` (``--step single``), the
  ``--levels``-level MGE step with one pass per term (``mge``) or per mesh
  (``mge-by-mesh``).
* ``--program layer``: forward + backward (value and gradient of
  ``0.5 sum(y^2)`` in the parameters and the input) of one layer, a
  mesh-free conv (``--layer mfc``) or a 3x3 conv (``conv3x3``), with
  ``--channels`` channels on a batch of ``--batch`` images: the benchmark's
  ``mfc`` section, broken down.

Configs (``--config``) set the defaults: ``smoke`` (16^2, seconds), ``cpu``
(64^2 step; 256^2, 128-channel layer) and ``paper`` (the papers' 64^2 step,
batch 16 and 4 levels; the layer at 256^2). Flags override them.

Usage::

  python -m experiments.profile_step --config cpu --model unet --step mge-by-mesh
  python -m experiments.profile_step --config cpu --program layer --layer mfc

Example finding (2-core CPU, 2026-12-02): in the 128-channel mesh-free conv's
forward + backward at 256^2, batch 16, the two inverse FFTs took 1.8 s each
of a 6.2 s call, against 0.42 s for the same ``irfft2`` run alone: they ran
on an XLA pool worker (lanes ``tf_XLAEigen...``), see :mod:`mgtrain.profiling`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from experiments import runtime  # noqa: F401  (sets XLA_FLAGS before jax)

import jax
import jax.numpy as jnp

from experiments.benchmark import BENCH_LAYERS, BENCH_MODELS, _bench_model, \
    check_model_hierarchy, layer_problem, stage_program
from experiments.cli import nonnegative_int, positive_int
from experiments.denoise import COMPUTE_DTYPES, CPU_CHUNK_RULE, add_conv_algorithm_argument, \
    add_sequential_argument, make_loss_fn, resolve_chunk_pixels, resolve_sequential
from mgtrain import full_multiscale as fm
from mgtrain import profiling
from mgtrain.hierarchy import Hierarchy
from mgtrain.nn import init_params
from mgtrain.nn.convs import resolve_conv_algorithm


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
  name: str
  model: str
  size: int
  levels: int
  base_batch: int
  layer_size: int
  layer_channels: int
  layer_batch: int
  calls: int


CONFIGS = {
    "smoke": ProfileConfig("smoke", "resnet", 16, 2, 1, 16, 8, 2, 1),
    "cpu": ProfileConfig("cpu", "resnet", 64, 4, 16, 256, 128, 16, 2),
    "paper": ProfileConfig("paper", "unet", 64, 4, 16, 256, 128, 16, 5),
}
STEPS = ("single", "mge", "mge-by-mesh")


def _layer_program(layer_name: str, channels: int, size: int, batch: int):
  _, params, x, loss = layer_problem(layer_name, channels, size, batch)
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
  return compiled, (lambda: compiled(params, x))


def _step_program(model_name: str, step: str, size: int, levels: int, base_batch: int,
                  dtype: str = "float32", sequential: bool = False,
                  conv_algorithm: str = "auto", chunk_pixels: int | None = None):
  model = _bench_model(model_name, dtype, conv_algorithm)
  hierarchy = Hierarchy(levels=levels, size=size, base_batch=base_batch, restriction="nearest")
  params = init_params(model, jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,)))
  pool = jax.random.uniform(jax.random.key(1), (64, size, size, 3), minval=-1, maxval=1)
  stage = (fm.Stage((0,), (base_batch,), 1) if step == "single"
           else fm.multiscale_schedule(hierarchy, 1)[0])
  jitted, state = stage_program(stage, hierarchy, make_loss_fn(model), params, chunk_pixels,
                                fuse_meshes=step == "mge-by-mesh", sequential=sequential)
  compiled = jitted.lower(state, pool).compile()
  holder = {"state": state}

  def run():   # the step donates its state: thread it through
    holder["state"], metrics = compiled(holder["state"], pool)
    return metrics["loss"]

  return compiled, run


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments.profile_step", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
  p.add_argument("--program", choices=("step", "layer"), default="step")
  p.add_argument("--model", choices=BENCH_MODELS, default=None)
  p.add_argument("--step", choices=STEPS, default="mge")
  p.add_argument("--layer", choices=BENCH_LAYERS, default="mfc")
  p.add_argument("--compute-dtype", choices=sorted(COMPUTE_DTYPES), default="float32",
                 help="step: the model's compute dtype (float32 params either way)")
  add_sequential_argument(p)
  add_conv_algorithm_argument(p)
  p.add_argument("--size", type=positive_int, default=None,
                 help="finest mesh (step) or image side (layer)")
  p.add_argument("--chunk-pixels", type=nonnegative_int, default=None,
                 help="step: samples x pixels per chunk of a pass, as in experiments.benchmark "
                      f"(default on CPU, by the finest mesh: {CPU_CHUNK_RULE}; off on GPU; "
                      "0 = off)")
  p.add_argument("--levels", type=positive_int, default=None)
  p.add_argument("--base-batch", type=positive_int, default=None)
  p.add_argument("--channels", type=positive_int, default=None, help="layer channels")
  p.add_argument("--batch", type=positive_int, default=None, help="layer batch")
  p.add_argument("--calls", type=positive_int, default=None,
                 help="traced calls (after one warm-up)")
  p.add_argument("--top", type=int, default=20, help="instructions in the Markdown table")
  p.add_argument("--device", choices=("cpu", "gpu"), default=None)
  p.add_argument("--workdir", default="runs/profile")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  runtime.use_device(args.device)
  cfg = CONFIGS[args.config]
  calls = args.calls or cfg.calls
  if args.program == "layer":
    what = {"program": "layer", "layer": args.layer,
            "channels": args.channels or cfg.layer_channels,
            "size": args.size or cfg.layer_size, "batch": args.batch or cfg.layer_batch}
    compiled, run = _layer_program(what["layer"], what["channels"], what["size"], what["batch"])
    title = (f"{what['layer']} forward+backward, {what['channels']} channels, "
             f"{what['size']}^2, batch {what['batch']}")
  else:
    what = {"program": "step", "model": args.model or cfg.model, "step": args.step,
            "size": args.size or cfg.size, "levels": args.levels or cfg.levels,
            "base_batch": args.base_batch or cfg.base_batch, "compute_dtype": args.compute_dtype,
            "sequential": resolve_sequential(args.sequential),
            "conv_algorithm": resolve_conv_algorithm(args.conv_algorithm)}
    what["chunk_pixels"] = resolve_chunk_pixels(args.chunk_pixels, jax.default_backend(),
                                                what["size"])
    check_model_hierarchy("--model / --size / --levels / --base-batch", [what["model"]],
                          what["levels"], what["size"], what["base_batch"])
    compiled, run = _step_program(what["model"], what["step"], what["size"], what["levels"],
                                  what["base_batch"], args.compute_dtype, what["sequential"],
                                  what["conv_algorithm"], what["chunk_pixels"])
    chunks = (f"chunks of {what['chunk_pixels']} px" if what["chunk_pixels"]
              else "passes whole")
    title = (f"{what['model']} {what['step']} train step at {what['size']}^2 "
             f"(N0 = {what['base_batch']}, {what['levels']} levels, {args.compute_dtype}, "
             f"{what['conv_algorithm']} convs, {chunks})")
  print(f"profiling {title} on {jax.devices()[0]} ...", file=sys.stderr, flush=True)
  prof = profiling.profile(compiled, calls=calls, run=run)
  out = {"config": args.config, **what, "backend": jax.default_backend(),
         "device": str(jax.devices()[0]), "jax": jax.__version__, **prof.to_dict()}
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "profile.json").write_text(json.dumps(out, indent=1))
  md = f"Profile of the {title} on {out['device']}\n\n{profiling.profile_table(prof, args.top)}\n"
  (workdir / "profile.md").write_text(md)
  print(md)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
