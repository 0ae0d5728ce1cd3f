"""Wall-clock timing of JAX calls, shared by the benchmarks.

JAX dispatches asynchronously: a jitted call returns before its result is
computed. :func:`seconds` therefore awaits the result
(``jax.block_until_ready``) inside the timed interval, and
:func:`median_seconds` reports the median of several such calls, which is
what every table of :mod:`experiments.benchmark`,
:mod:`experiments.host_speed`, :mod:`experiments.layer_levers` and
:mod:`experiments.winograd_thresholds` gives. The first call of a jitted
function compiles it; pass ``warmup`` (or call it once yourself) so that
compile time stays out of the timed calls.

>>> import jax.numpy as jnp
>>> median, times = median_seconds(lambda: jnp.ones(4) * 2, repeats=3, warmup=1)
>>> len(times), median > 0
(3, True)
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def seconds(fn: Callable[[], object]) -> float:
  """Wall seconds of one call of ``fn()``, its result awaited."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def median_seconds(fn: Callable[[], object], repeats: int,
                   warmup: int = 0) -> tuple[float, list[float]]:
  """Median wall seconds of ``repeats`` awaited calls of ``fn()``, after
  ``warmup`` untimed (awaited) calls.

  Returns:
    ``(median, times)``: the median, and every timed call's seconds in order.

  Raises:
    ValueError: if ``repeats`` is not a positive integer or ``warmup`` is
      negative.
  """
  if not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
  if not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = [seconds(fn) for _ in range(repeats)]
  return statistics.median(times), times
