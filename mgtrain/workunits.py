"""Work units (#WU): the papers' machine-independent cost of training.

Definition 1 (MGE paper, Appendix B): *one WU is one application of the model
to one image on the finest mesh*. A mesh coarsened ``j`` times has
``4^-j`` of the pixels, so an application there costs ``4^-j`` WU. A
correction term of the telescoping sum evaluates the *same* samples on two
adjacent meshes, so level ``j < L-1`` with batch ``N_j`` costs
``N_j (4^-j + 4^-(j+1))`` and the coarsest level ``N_{L-1} 4^-(L-1)``
(Eq. 39).

The general sums here are exact (:class:`fractions.Fraction`); the paper's
closed forms (Eq. 40, 41, 47, 48) are spelled out separately so tests can
check one against the other:

* Multiscale, ``N_j = 2^j N_0``, 4 levels: ``37/16 N_0 I`` (Eq. 40);
* Single-scale on the same samples: ``15 N_0 I`` (Eq. 41);
* Full-Multiscale, ``I = I_8h = 2 I_4h = 4 I_2h = 8 I_h``: ``115/128 N_0 I``
  (Eq. 47); with equal iterations per level ``63/16 N_0 I`` (Eq. 48).

Example (Table 2 of the MGE paper, ``N_0 = 16``, ``I = 2000``):
  >>> float(single_scale_closed_form(16, 2000))
  480000.0
  >>> float(multiscale_closed_form(16, 2000))
  74000.0
  >>> float(full_multiscale_closed_form(16, 2000))
  28750.0
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence


def level_cost(level: int) -> Fraction:
  """#WU of one model application to one image on ``level``: ``4^-level``."""
  if level < 0:
    raise ValueError(f"level must be >= 0, got {level}")
  return Fraction(1, 4**level)


def step_work_units(levels: Sequence[int], batch_sizes: Sequence[int]) -> Fraction:
  """#WU of one MGE step over consecutive global ``levels`` (finest first).

  ``levels = (f, f+1, ..., c)`` with ``batch_sizes[i]`` samples drawn for
  ``levels[i]``; every level but the coarsest evaluates its samples on two
  meshes (Eq. 39, Eq. 42-45). A single level is plain single-scale SGD on
  that mesh.

  >>> step_work_units((0, 1, 2, 3), (16, 32, 64, 128))
  Fraction(37, 1)
  >>> step_work_units((0,), (240,))
  Fraction(240, 1)
  """
  levels, batch_sizes = tuple(levels), tuple(batch_sizes)
  if not levels:
    raise ValueError("at least one level is needed")
  if len(levels) != len(batch_sizes):
    raise ValueError(f"{len(levels)} levels but {len(batch_sizes)} batch sizes")
  if any(b - a != 1 for a, b in zip(levels, levels[1:])):
    raise ValueError(f"levels must be consecutive, finest first; got {levels}")
  total = Fraction(0)
  for i, (level, n) in enumerate(zip(levels, batch_sizes)):
    if n < 1:
      raise ValueError(f"batch size of level {level} must be positive, got {n}")
    cost = level_cost(level)
    if i < len(levels) - 1:
      cost += level_cost(level + 1)
    total += n * cost
  return total


def schedule_work_units(stages: Sequence[tuple[Sequence[int], Sequence[int], int]]
                        ) -> Fraction:
  """#WU of a whole run: ``sum_s iterations_s * step_work_units(stage s)``.

  Args:
    stages: ``(levels, batch_sizes, iterations)`` per stage, in run order.
  """
  return sum((it * step_work_units(lv, bs) for lv, bs, it in stages), Fraction(0))


def doubling_batches(base_batch: int, levels: int, growth: int = 2) -> tuple[int, ...]:
  """``N_j = growth^j N_0`` for ``j = 0..levels-1`` (the reference schedule)."""
  return tuple(base_batch * growth**j for j in range(levels))


def multiscale_work_units(base_batch: int, iterations: int, levels: int = 4,
                          growth: int = 2) -> Fraction:
  """General Multiscale (MGE every step) total: ``I * step_work_units``."""
  batches = doubling_batches(base_batch, levels, growth)
  return iterations * step_work_units(range(levels), batches)


def single_scale_work_units(base_batch: int, iterations: int, levels: int = 4,
                            growth: int = 2) -> Fraction:
  """Single-scale on the same samples as MGE: ``I * sum_j N_j`` on the finest mesh."""
  return Fraction(iterations * sum(doubling_batches(base_batch, levels, growth)))


def full_multiscale_work_units(base_batch: int, stage_iterations: Sequence[int],
                               levels: int | None = None, growth: int = 2) -> Fraction:
  """General Full-Multiscale total (Algorithm 2 with a j-level MGE per stage).

  Stage ``s`` (0 = coarsest) trains on level ``L-1-s`` with the levels
  ``L-1-s .. L-1`` and the global batches ``N_k = growth^k N_0``, so its
  finest batch is ``N_0^{(2^{L-1-s} h)} = 2^{L-1-s} N_0`` as in Appendix B.

  Args:
    base_batch: ``N_0``.
    stage_iterations: iterations per stage, coarsest first.
    levels: ``L`` (defaults to ``len(stage_iterations)``).
  """
  stage_iterations = tuple(stage_iterations)
  levels = len(stage_iterations) if levels is None else levels
  if len(stage_iterations) != levels:
    raise ValueError(f"{len(stage_iterations)} stage iterations for {levels} levels")
  batches = doubling_batches(base_batch, levels, growth)
  stages = []
  for s, it in enumerate(stage_iterations):
    lv = tuple(range(levels - 1 - s, levels))
    stages.append((lv, tuple(batches[k] for k in lv), it))
  return schedule_work_units(stages)


def halving_iterations(coarsest_iterations: int, levels: int) -> tuple[int, ...]:
  """``I, I/2, ..., I/2^(L-1)`` coarse to fine (the denoise/deblur schedule)."""
  its = tuple(coarsest_iterations // 2**s for s in range(levels))
  if any(i < 1 for i in its) or coarsest_iterations % 2 ** (levels - 1):
    raise ValueError(
        f"{coarsest_iterations} iterations cannot be halved {levels - 1} times")
  return its


# ------------------------------------------------------------------ closed forms
def multiscale_closed_form(n0: int, iterations: int) -> Fraction:
  """Eq. 40: ``#WU_Multiscale = 37/16 N_0 I`` (4 levels, ``N_j = 2^j N_0``)."""
  return Fraction(37, 16) * n0 * iterations


def single_scale_closed_form(n0: int, iterations: int) -> Fraction:
  """Eq. 41: ``#WU_Single-scale = 15 N_0 I`` (same samples as 4-level MGE)."""
  return Fraction(15) * n0 * iterations


def full_multiscale_closed_form(n0: int, iterations: int) -> Fraction:
  """Eq. 47: ``115/128 N_0 I`` for ``I = I_8h = 2 I_4h = 4 I_2h = 8 I_h``."""
  return Fraction(115, 128) * n0 * iterations


def full_multiscale_equal_closed_form(n0: int, iterations: int) -> Fraction:
  """Eq. 48: ``63/16 N_0 I`` for equal iterations ``I`` on every level."""
  return Fraction(63, 16) * n0 * iterations


def mge_step_closed_form(n0: int, levels: int) -> Fraction:
  """#WU of one ``L``-level MGE step with doubling batches: ``N_0 (5/2 - 3 * 2^-L)``.

  From Eq. 39 summed for general ``L``:
  ``N_0 [5/4 sum_{k<L-1} 2^-k + 2^-(L-1)]``. ``L = 4`` gives ``37/16 N_0``.
  """
  return n0 * (Fraction(5, 2) - Fraction(3, 2**levels))


__all__ = [
    "level_cost", "step_work_units", "schedule_work_units", "doubling_batches",
    "multiscale_work_units", "single_scale_work_units",
    "full_multiscale_work_units", "halving_iterations",
    "multiscale_closed_form", "single_scale_closed_form",
    "full_multiscale_closed_form", "full_multiscale_equal_closed_form",
    "mge_step_closed_form",
]
