"""Argument types of the experiment CLIs (experiments.cli) and their use."""

import argparse
import re

import pytest

from experiments import benchmark, blur_estimation, denoise, first_step, gradient_discrepancy, \
    layer_levers, levers, mfc_kernels, profile_step, winograd_thresholds, workunits
from experiments.cli import existing_folder, nonnegative_float, nonnegative_int, positive_float, \
    positive_int, unit_fraction


@pytest.mark.parametrize("text,value", [("1", 1), ("240", 240), (" 7 ", 7)])
def test_positive_int_accepts_counts(text, value):
  assert positive_int(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "2.5", "x", ""])
def test_positive_int_refuses_the_rest(text):
  with pytest.raises(argparse.ArgumentTypeError, match="must be a positive integer"):
    positive_int(text)


def test_nonnegative_int_keeps_zero_and_refuses_negatives():
  assert nonnegative_int("0") == 0 and nonnegative_int("16384") == 16384
  with pytest.raises(argparse.ArgumentTypeError, match="must be an integer >= 0"):
    nonnegative_int("-1")


def test_real_types_take_finite_numbers_in_their_range():
  assert positive_float("3e-4") == 3e-4 and positive_float(" 2 ") == 2.0
  assert nonnegative_float("0") == 0.0 and unit_fraction("0.999") == 0.999
  for text in ("0", "-1e-3", "nan", "inf", "x", ""):
    with pytest.raises(argparse.ArgumentTypeError, match="must be a positive number"):
      positive_float(text)
  with pytest.raises(argparse.ArgumentTypeError, match="must be a number >= 0"):
    nonnegative_float("-0.01")
  for text in ("1", "-0.5", "1.5"):
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number in \[0, 1\)"):
      unit_fraction(text)


@pytest.mark.parametrize("parse,argv", [
    (benchmark.parse_args, ["--repeats", "0"]),
    (benchmark.parse_args, ["--chunk-pixels", "-5"]),
    (benchmark.parse_args, ["--sizes", "64", "0"]),
    (denoise.parse_args, ["--iterations", "0"]),
    (denoise.parse_args, ["--chunk-pixels", "-1"]),
    (denoise.parse_args, ["--devices", "-2"]),
    (denoise.parse_args, ["--learning-rate", "-1"]),
    (blur_estimation.parse_args, ["--lr-mfc", "0"]),
    (blur_estimation.parse_args, ["--lr-standard", "nan"]),
    (blur_estimation.parse_args, ["--rel-tol", "1"]),
    (blur_estimation.parse_args, ["--reach-tol", "-0.01"]),
    (gradient_discrepancy.main, ["--length-scale", "0"]),
    (mfc_kernels.main, ["--length-scale", "-0.05"]),
    (benchmark.parse_args, ["--ttm-data-dir", "/no/such/folder"]),
    (levers.main, ["--repeats", "0"]),
    (blur_estimation.parse_args, ["--eval-every", "0"]),
    (first_step.main, ["--size", "0"]),
    (mfc_kernels.main, ["--channels", "0"]),
    (mfc_kernels.main, ["--image-sizes", "16", "-32"]),
    (layer_levers.parse_args, ["--repeats", "0"]),
    (profile_step.parse_args, ["--calls", "0"]),
    (winograd_thresholds.parse_args, ["--repeats", "0"]),
    (workunits.main, ["--levels", "0"]),
])
def test_every_cli_refuses_a_bad_number_when_parsing(parse, argv, capsys):
  with pytest.raises(SystemExit) as exc:
    parse(argv)
  assert exc.value.code == 2            # argparse's usage error, before any work
  assert re.search("must be|no such folder", capsys.readouterr().err)


def test_existing_folder_takes_a_folder_only(tmp_path):
  assert existing_folder(str(tmp_path)) == str(tmp_path)
  (tmp_path / "f.png").write_bytes(b"")
  for text in (str(tmp_path / "f.png"), str(tmp_path / "missing")):
    with pytest.raises(argparse.ArgumentTypeError, match="no such folder"):
      existing_folder(text)


def test_zero_keeps_its_meaning_where_it_has_one():
  """0 is "off" for --chunk-pixels and "all devices" for --devices."""
  args = denoise.parse_args(["--chunk-pixels", "0", "--devices", "0"])
  assert args.chunk_pixels == 0 and args.devices == 0
  assert benchmark.parse_args(["--settle", "0"]).settle == 0
