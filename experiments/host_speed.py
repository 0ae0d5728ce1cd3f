"""How fast this machine is right now: memory streaming and matrix products.

The CPU host these benchmarks run on is a VM whose speed changes from hour
to hour. Compute-bound programs (3x3 convs) and memory-bound ones (the
mesh-free conv's FFTs and layout copies) do not slow down together: on
2026-12-06 the same MFC layer code measured 0.47-0.55x the direct conv's
time in three morning runs and 0.81x in an afternoon one, when a streaming
``v * 2`` over 134 MB took 15-17 ms instead of 9 ms
(docs/benchmark_cpu.md). :func:`host_speed` measures both kinds of work in
a second, so a results file says which kind of hour it was timed in.

* ``stream_gb_s``: bytes read plus bytes written per second by the jitted
  ``v * 2`` over a float32 array of ``stream_mib`` MiB (median of
  ``repeats`` calls after two warm-up calls);
* ``matmul_gflop_s``: ``2 n^3`` floating-point operations per second of a
  jitted float32 ``a @ b`` with ``n x n`` operands.

Usage::

  python -m experiments.host_speed            # this device, prints one line
  python -m experiments.host_speed --json     # the same as JSON

>>> speed = host_speed(stream_mib=4, matmul_n=64, repeats=2)
>>> sorted(speed), all(v > 0 for k, v in speed.items() if k.endswith("_s"))
(['device', 'matmul_gflop_s', 'matmul_n', 'stream_gb_s', 'stream_mib'], True)
"""

from __future__ import annotations

import argparse
import functools
import json

from experiments import runtime  # noqa: F401  (sets XLA_FLAGS before jax)

import jax
import jax.numpy as jnp

from experiments.cli import positive_int
from experiments.timing import median_seconds


def _median_seconds(fn, repeats: int) -> float:
  # Two warm-up calls: the first compiles, the second faults in the output's pages.
  return median_seconds(fn, repeats, warmup=2)[0]


def host_speed(stream_mib: int = 128, matmul_n: int = 1024, repeats: int = 9,
               device: jax.Device | None = None) -> dict:
  """Memory-stream and matmul throughput of ``device`` (default: JAX's first).

  Args:
    stream_mib: size of the streamed float32 array, in MiB (bigger than the
      caches, so that it measures memory: 128 by default).
    matmul_n: side of the square float32 matrices multiplied.
    repeats: timed calls per measurement; the median is reported.
    device: where to run; the default device if ``None``.

  Returns:
    ``{"device", "stream_mib", "stream_gb_s", "matmul_n", "matmul_gflop_s"}``.
  """
  for name, value in (("stream_mib", stream_mib), ("matmul_n", matmul_n),
                      ("repeats", repeats)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  device = device or jax.devices()[0]
  elements = stream_mib * 2**20 // 4
  v = jax.device_put(jnp.ones((elements,), jnp.float32), device)
  double = jax.jit(lambda x: x * 2)
  stream_s = _median_seconds(functools.partial(double, v), repeats)
  del v
  a = jax.device_put(jax.random.normal(jax.random.key(0), (matmul_n, matmul_n)), device)
  square = jax.jit(lambda x: x @ x)
  matmul_s = _median_seconds(functools.partial(square, a), repeats)
  return {"device": str(device), "stream_mib": stream_mib,
          "stream_gb_s": 2 * elements * 4 / stream_s / 1e9,
          "matmul_n": matmul_n, "matmul_gflop_s": 2 * matmul_n**3 / matmul_s / 1e9}


def describe(speed: dict, end: dict | None = None) -> str:
  """One line for logs and Markdown headers; with ``end``, a run's start and
  end measurements side by side (``start / end``).

  >>> s = {"device": "cpu:0", "stream_mib": 128, "stream_gb_s": 31.5,
  ...      "matmul_n": 1024, "matmul_gflop_s": 120.0}
  >>> describe(s)
  'cpu:0: memory stream 31.5 GB/s (v * 2 over 128 MiB), float32 matmul 120 GFLOP/s (n = 1024)'
  >>> describe(s, dict(s, stream_gb_s=15.0))
  'cpu:0: memory stream 31.5 / 15.0 GB/s (v * 2 over 128 MiB), float32 matmul 120 / 120 GFLOP/s (n = 1024)'
  """
  both = (speed,) if end is None else (speed, end)
  stream = " / ".join(f"{m['stream_gb_s']:.1f}" for m in both)
  matmul = " / ".join(f"{m['matmul_gflop_s']:.0f}" for m in both)
  return (f"{speed['device']}: memory stream {stream} GB/s (v * 2 over "
          f"{speed['stream_mib']} MiB), float32 matmul {matmul} GFLOP/s "
          f"(n = {speed['matmul_n']})")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--stream-mib", type=positive_int, default=128)
  p.add_argument("--matmul-n", type=positive_int, default=1024)
  p.add_argument("--repeats", type=positive_int, default=9)
  p.add_argument("--json", action="store_true", help="print JSON instead of one line")
  args = p.parse_args(argv)
  speed = host_speed(args.stream_mib, args.matmul_n, args.repeats)
  print(json.dumps(speed, indent=2) if args.json else describe(speed))
  return speed


if __name__ == "__main__":
  main()
