"""Where Winograd F(4x4, 3x3) and im2col beat XLA's direct 3x3 conv: a grid of small layers.

:class:`mgtrain.nn.conv_dispatch.Conv3x3Dispatch` sends a SAME 3x3 conv to
the patch matrix product of :mod:`mgtrain.nn.im2col` on meshes of at most
2 x 2, and to Winograd only from a number of ``batch x pixels`` that depends
on the layer's width (its ``winograd_thresholds``). This module measures
what those rules rest on: for each channel width ``C`` (``C -> C``) and each
``mesh x batch`` of the grid, the median forward+backward seconds (gradient
of ``0.5 sum(y^2)`` with respect to input and kernel) of
``lax.conv_general_dilated``, :func:`mgtrain.nn.winograd.winograd_conv3x3`
and :func:`mgtrain.nn.im2col.im2col_conv3x3`, one after the other in this
process, their ratios to the direct conv (below 1: faster) and the
dispatcher's choice.

The default grid is the one behind the thresholds (2026-12-04, evening;
docs/benchmark_cpu.md), meshes 4^2 to 32^2, 256 to 4,096 pixels, plus the
tiny meshes behind the im2col rule (1^2 to 3^2), at 32, 64, 128 and 256
channels. It took 2 min 26 s on the 2-core CPU (2026-12-04, night).

Usage::

  python -m experiments.winograd_thresholds
  python -m experiments.winograd_thresholds --channels 128 --shapes 2x192 8x16
  python -m experiments.winograd_thresholds --config smoke --workdir /tmp/wt

Writes ``WORKDIR/winograd_thresholds.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments import runtime  # noqa: F401  (sets XLA_FLAGS before jax)

import jax
import jax.numpy as jnp

from experiments.cli import positive_int
from experiments.timing import median_seconds
from experiments.layer_levers import conv3x3
from mgtrain.nn.conv_dispatch import Conv3x3Dispatch
from mgtrain.nn.im2col import im2col_conv3x3
from mgtrain.nn.winograd import winograd_conv3x3

DEFAULT_SHAPES = ("1x192", "2x16", "2x192", "3x96", "4x16", "4x64", "4x128", "8x4", "8x16",
                  "8x32", "8x64", "16x4", "16x8", "16x16", "32x2", "32x4")
ALGORITHMS = {"direct": conv3x3, "winograd": winograd_conv3x3, "im2col": im2col_conv3x3}
CONFIGS = {   # channels, shapes, repeats
    "cpu": ((32, 64, 128, 256), DEFAULT_SHAPES, 7),
    "smoke": ((8,), ("4x2",), 1),
}


def parse_shape(text: str) -> tuple[int, int]:
  """``"MESHxBATCH"`` -> ``(mesh, batch)``."""
  try:
    mesh, batch = (int(part) for part in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"a shape is MESHxBATCH, e.g. 8x16; got {text!r}") from None
  if mesh < 1 or batch < 1:
    raise argparse.ArgumentTypeError(f"mesh and batch must be >= 1, got {text!r}")
  return mesh, batch


def time_algorithms(channels: int, mesh: int, batch: int, repeats: int) -> dict:
  """Median fwd+bwd seconds of each of :data:`ALGORITHMS`, their ratios to direct."""
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (batch, mesh, mesh, channels))
  w = jax.random.normal(kw, (3, 3, channels, channels)) / (9 * channels) ** 0.5
  row = {"channels": channels, "mesh": mesh, "batch": batch, "pixels": batch * mesh * mesh}
  for name, conv in ALGORITHMS.items():
    grad = jax.jit(jax.grad(lambda x, w, conv=conv: 0.5 * jnp.sum(jnp.square(conv(x, w))),
                            argnums=(0, 1)))
    jax.block_until_ready(grad(x, w))               # compiles
    row[f"{name}_s"] = median_seconds(lambda: grad(x, w), repeats)[0]
  for name in ("winograd", "im2col"):
    row[f"{name}_ratio"] = row[f"{name}_s"] / row["direct_s"]
  row["default_dispatch"] = Conv3x3Dispatch().choose(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return row


def table(rows: list[dict]) -> str:
  lines = ["| channels | mesh x batch | pixels | direct ms | Winograd ms | im2col ms "
           "| Winograd / direct | im2col / direct | default dispatch |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['channels']} | {r['mesh']}² x {r['batch']} | {r['pixels']:,} "
                 f"| {1e3 * r['direct_s']:.2f} | {1e3 * r['winograd_s']:.2f} "
                 f"| {1e3 * r['im2col_s']:.2f} | {r['winograd_ratio']:.2f} "
                 f"| {r['im2col_ratio']:.2f} | {r['default_dispatch']} |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments.winograd_thresholds",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
  p.add_argument("--channels", type=positive_int, nargs="+", default=None)
  p.add_argument("--shapes", type=parse_shape, nargs="+", default=None,
                 help="MESHxBATCH pairs (default: the config's grid)")
  p.add_argument("--repeats", type=positive_int, default=None)
  p.add_argument("--workdir", default="runs/winograd_thresholds")
  args = p.parse_args(argv)
  channels, shapes, repeats = CONFIGS[args.config]
  args.channels = list(channels if args.channels is None else args.channels)
  args.shapes = [parse_shape(s) for s in shapes] if args.shapes is None else args.shapes
  args.repeats = repeats if args.repeats is None else args.repeats
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = []
  for c in args.channels:
    for mesh, batch in args.shapes:
      rows.append(time_algorithms(c, mesh, batch, args.repeats))
      r = rows[-1]
      print(f"{c:4d} ch, {mesh:3d}^2 x {batch:4d} = {r['pixels']:6d} px: direct "
            f"{1e3 * r['direct_s']:8.2f} ms, winograd {1e3 * r['winograd_s']:8.2f} ms, "
            f"im2col {1e3 * r['im2col_s']:8.2f} ms ({r['default_dispatch']})", flush=True)
      (workdir / "winograd_thresholds.json").write_text(json.dumps(
          {"backend": jax.default_backend(), "jax": jax.__version__,
           "repeats": args.repeats, "rows": rows}, indent=2))
  md = table(rows)
  (workdir / "winograd_thresholds.md").write_text(
      f"Winograd F(4x4, 3x3) and im2col vs the direct 3x3 conv, fwd+bwd, on {jax.devices()[0]} "
      f"(jax {jax.__version__}), median of {args.repeats}, one process\n\n{md}\n")
  print(md)
  return rows


if __name__ == "__main__":
  main()
