"""Times the PyTorch twin's steps one kind at a time (the benchmark's section 1b).

``../shared/bench/torch_twin.py`` times three steps of its ResNet in one go
and prints one JSON line at the end, so when its single-scale b240 step runs
out of memory (at 128^2 on a 24 GB machine) nothing is left of the other
two. This script imports the twin's model and repeats its step exactly (the
same batches, the same telescoping loss with 2x2 average pooling, Adam 5e-4,
``zero_grad; backward; step``), but prints one JSON line per step kind as
soon as it is measured. The benchmark runs it as a subprocess and keeps what
it printed if it is killed.

Usage::

  python -m experiments.torch_steps --twin ../shared/bench/torch_twin.py --res 64 \\
      --kinds single_b16 mge4 single_b240
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

# kind -> (levels below the finest, N_0), as in the twin's main()
KINDS = {"single_b16": (0, 16), "mge4": (3, 16), "single_b240": (0, 240)}


def load_twin(path: Path):
  spec = importlib.util.spec_from_file_location("torch_twin", path)
  if spec is None or spec.loader is None:
    raise SystemExit(f"cannot import {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m experiments.torch_steps", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--twin", type=Path, required=True)
  p.add_argument("--res", type=int, default=64)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--kinds", nargs="+", choices=tuple(KINDS), default=list(KINDS))
  args = p.parse_args(argv)

  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  tw = load_twin(args.twin)
  torch.manual_seed(0)
  net = tw.ResNet()
  opt = torch.optim.Adam(net.parameters(), lr=5e-4)

  def batches(levels, n0):
    out, n = [], n0
    for _ in range(levels + 1):
      y, t = torch.rand(n, 3, args.res, args.res), torch.rand(n)
      u = t[:, None, None, None] * y + (1 - t[:, None, None, None]) * torch.randn_like(y)
      out.append((u, y, t))
      n *= 2
    return out

  def loss(bs, levels):
    total = 0.0
    for i, (u, y, t) in enumerate(bs):
      f = 2 ** i
      fine = F.mse_loss(net(tw.pool(u, f), t), tw.pool(y, f))
      if i < levels:
        fine = fine - F.mse_loss(net(tw.pool(u, 2 * f), t), tw.pool(y, 2 * f))
      total = total + fine
    return total

  print(json.dumps({"res": args.res, "params": sum(p.numel() for p in net.parameters()),
                    "threads": torch.get_num_threads()}), flush=True)
  for kind in args.kinds:
    levels, n0 = KINDS[kind]
    # The twin halves the repeats of its slow b240 step; so does this.
    reps = max(1, args.reps // 2) if kind == "single_b240" else args.reps
    bs = batches(levels, n0)
    times = []
    for i in range(reps + 1):
      t0 = time.perf_counter()
      opt.zero_grad()
      loss(bs, levels).backward()
      opt.step()
      if i:
        times.append(time.perf_counter() - t0)
    print(json.dumps({kind: statistics.median(times)}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
