"""Argument types shared by the experiment CLIs: numbers are checked when parsed.

A count such as ``--repeats 0`` or ``--chunk-pixels -5`` used to be accepted
and fail minutes later (a median of no timings, after every program had
compiled) or, worse, run with a meaning nobody asked for; so did a rate such
as ``--learning-rate -1``, which trained uphill to a loss of 1e11. With these
types argparse rejects it at once, with the usual usage line.

Example:
  >>> import argparse
  >>> p = argparse.ArgumentParser(prog="demo")
  >>> _ = p.add_argument("--repeats", type=positive_int, default=3)
  >>> p.parse_args(["--repeats", "5"]).repeats
  5
  >>> positive_int("0")
  Traceback (most recent call last):
  ...
  argparse.ArgumentTypeError: must be a positive integer, got '0'
  >>> positive_float("3e-4")
  0.0003
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _integer(text: str, minimum: int, what: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
  if value < minimum:
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
  return value


def positive_int(text: str) -> int:
  """An integer >= 1 (sizes, batches, levels, repeats, iterations)."""
  return _integer(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
  """An integer >= 0, for options where 0 means "off" or "all"."""
  return _integer(text, 0, "an integer >= 0")


def _real(text: str, accept, what: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
  if not (math.isfinite(value) and accept(value)):
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
  return value


def positive_float(text: str) -> float:
  """A finite number > 0 (learning rates, length scales)."""
  return _real(text, lambda v: v > 0, "a positive number")


def nonnegative_float(text: str) -> float:
  """A finite number >= 0 (tolerances)."""
  return _real(text, lambda v: v >= 0, "a number >= 0")


def unit_fraction(text: str) -> float:
  """A number in ``[0, 1)``: a relative tolerance such as "improves by 0.1%"."""
  return _real(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def existing_folder(text: str) -> str:
  """A path to a folder that exists (an image folder read later in the run)."""
  if not Path(text).expanduser().is_dir():
    raise argparse.ArgumentTypeError(f"no such folder: {text!r}")
  return text
