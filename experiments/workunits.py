"""Prints the #WU tables of the MGE paper (Appendix B, Table 2, Table 6) from the closed forms.

Usage::

  python -m experiments.workunits                # N0 = 16, I = 2000 (Table 2)
  python -m experiments.workunits --n0 8 --iterations 250 --levels 4

Each row shows the general sum over the schedule (what a live run counts)
beside the paper's closed form, and the ratio to single-scale.
"""

from __future__ import annotations

import argparse

from experiments.cli import positive_int
from mgtrain import workunits as wu


def rows(n0: int, iterations: int, levels: int):
  single = wu.single_scale_work_units(n0, iterations, levels)
  out = [("Single-scale (same samples, Eq. 41)", single,
          wu.single_scale_closed_form(n0, iterations) if levels == 4 else None)]
  out.append(("Multiscale (Eq. 40)", wu.multiscale_work_units(n0, iterations, levels),
              wu.multiscale_closed_form(n0, iterations) if levels == 4 else None))
  if iterations % 2 ** (levels - 1) == 0:
    out.append(("Full-Multiscale, I, I/2, I/4, ... (Eq. 47)",
                wu.full_multiscale_work_units(n0, wu.halving_iterations(iterations, levels)),
                wu.full_multiscale_closed_form(n0, iterations) if levels == 4 else None))
  out.append(("Full-Multiscale, equal iterations (Eq. 48)",
              wu.full_multiscale_work_units(n0, (iterations,) * levels),
              wu.full_multiscale_equal_closed_form(n0, iterations) if levels == 4 else None))
  return single, out


def table(n0: int, iterations: int, levels: int) -> str:
  single, body = rows(n0, iterations, levels)
  lines = [f"#WU for N0 = {n0}, I = {iterations}, {levels} levels, batches "
           f"{wu.doubling_batches(n0, levels)}",
           "",
           "| strategy | #WU (sum over schedule) | paper closed form | per N0*I | "
           "single / this |",
           "|---|---|---|---|---|"]
  for name, value, closed in body:
    per = value / (n0 * iterations)
    lines.append(
        f"| {name} | {float(value):,.1f} | "
        f"{'-' if closed is None else f'{float(closed):,.1f}'} | "
        f"{per} = {float(per):.4f} | {float(single / value):.2f}x |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m experiments.workunits",
                              description=__doc__.splitlines()[0])
  p.add_argument("--n0", type=positive_int, default=16)
  p.add_argument("--iterations", type=positive_int, default=2000)
  p.add_argument("--levels", type=positive_int, default=4)
  args = p.parse_args(argv)
  text = table(args.n0, args.iterations, args.levels)
  if args.levels == 4:
    text += ("\n\nTable 2 of the MGE paper: 480k / 74k / 28.7k. Equal iterations: "
             f"63/16 N0 I = {float(wu.full_multiscale_equal_closed_form(args.n0, args.iterations)):,.0f}.")
  print(text)
  return text


if __name__ == "__main__":
  main()
