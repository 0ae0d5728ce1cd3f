from fractions import Fraction

import pytest

from mgtrain import workunits as wu


def test_table2_closed_forms():
  # MGE paper, Table 2: N0 = 16, I = 2000.
  assert wu.single_scale_closed_form(16, 2000) == 480_000
  assert wu.multiscale_closed_form(16, 2000) == 74_000
  assert wu.full_multiscale_closed_form(16, 2000) == 28_750


def test_general_sums_equal_paper_closed_forms():
  for n0 in (1, 2, 8, 16):
    for it in (8, 16, 2000):
      assert wu.multiscale_work_units(n0, it, 4) == wu.multiscale_closed_form(n0, it)
      assert wu.single_scale_work_units(n0, it, 4) == wu.single_scale_closed_form(n0, it)
      assert (wu.full_multiscale_work_units(n0, wu.halving_iterations(it, 4))
              == wu.full_multiscale_closed_form(n0, it))
      assert (wu.full_multiscale_work_units(n0, (it,) * 4)
              == wu.full_multiscale_equal_closed_form(n0, it))


def test_eq39_per_step_and_ratios():
  assert wu.step_work_units((0, 1, 2, 3), (16, 32, 64, 128)) == 37
  ratio = wu.single_scale_closed_form(1, 1) / wu.multiscale_closed_form(1, 1)
  assert ratio == Fraction(240, 37)  # "roughly 6.5 times cheaper"
  assert (wu.single_scale_closed_form(1, 1)
          / wu.full_multiscale_closed_form(1, 1)) == Fraction(1920, 115)  # ~16.7x


def test_two_level_example_of_section_2():
  # N_2 = 4 N_1 = N: cost N/4 + N/4 (1 + 1/4) = 9N/16 (Section 2.1).
  n = 64
  assert wu.step_work_units((0, 1), (n // 4, n)) == Fraction(9 * n, 16)


def test_general_level_formula():
  for levels in range(1, 8):
    batches = wu.doubling_batches(4, levels)
    assert wu.step_work_units(range(levels), batches) == wu.mge_step_closed_form(4, levels)


def test_table6_three_levels():
  # Table 6: 3-level Multiscale 68k #WU (N0 = 16, I = 2000).
  assert wu.multiscale_work_units(16, 2000, levels=3) == 68_000


def test_full_multiscale_stage_terms_match_eq_42_to_45():
  n0, i = 16, 2000
  its = wu.halving_iterations(i, 4)
  assert its == (2000, 1000, 500, 250)
  stage_8h = Fraction(its[0], 64) * 8 * n0
  stage_4h = Fraction(its[1], 16) * (4 * n0 * Fraction(5, 4) + 8 * n0 * Fraction(1, 4))
  stage_2h = Fraction(its[2], 4) * (2 * n0 * Fraction(5, 4) + 4 * n0 * Fraction(5, 16)
                                    + 8 * n0 * Fraction(1, 16))
  stage_h = its[3] * (n0 * Fraction(5, 4) + 2 * n0 * Fraction(5, 16)
                      + 4 * n0 * Fraction(5, 64) + 8 * n0 * Fraction(1, 64))
  assert wu.full_multiscale_work_units(n0, its) == stage_8h + stage_4h + stage_2h + stage_h


@pytest.mark.parametrize("call, match", [
    (lambda: wu.step_work_units((), ()), "at least one level"),
    (lambda: wu.step_work_units((0, 2), (1, 1)), "consecutive"),
    (lambda: wu.step_work_units((0, 1), (1,)), "2 levels but 1 batch"),
    (lambda: wu.step_work_units((0,), (0,)), "must be positive"),
    (lambda: wu.halving_iterations(6, 3), "cannot be halved"),
    (lambda: wu.full_multiscale_work_units(1, (4, 2), levels=3), "2 stage iterations"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_workunits_cli_prints_table2(capsys):
  from experiments import workunits as cli
  cli.main([])
  out = capsys.readouterr().out
  for figure in ("480,000.0", "74,000.0", "28,750.0", "126,000.0", "63/16", "115/128"):
    assert figure in out
