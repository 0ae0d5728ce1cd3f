"""Argument types shared by the experiment CLIs: counts are checked when parsed.

A count such as ``--repeats 0`` or ``--chunk-pixels -5`` used to be accepted
and fail minutes later (a median of no timings, after every program had
compiled) or, worse, run with a meaning nobody asked for. With these types
argparse rejects it at once, with the usual usage line.

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
"""

from __future__ import annotations

import argparse


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
