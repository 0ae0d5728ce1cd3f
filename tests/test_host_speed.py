"""experiments.host_speed: throughputs from timed programs, and its input checks."""

import json

import pytest

from experiments import host_speed


def test_throughputs_follow_from_the_timed_seconds(monkeypatch):
  # With every program timed at exactly 0.5 s, the throughputs are the work over 0.5 s.
  monkeypatch.setattr(host_speed, "_median_seconds", lambda fn, repeats: 0.5)
  speed = host_speed.host_speed(stream_mib=8, matmul_n=100, repeats=1)
  assert speed["stream_gb_s"] == pytest.approx(2 * 8 * 2**20 / 0.5 / 1e9)
  assert speed["matmul_gflop_s"] == pytest.approx(2 * 100**3 / 0.5 / 1e9)


@pytest.mark.parametrize("kwargs", [{"stream_mib": 0}, {"matmul_n": -3}, {"repeats": 1.5}])
def test_bad_sizes_are_refused(kwargs):
  with pytest.raises(ValueError, match="positive integer"):
    host_speed.host_speed(**kwargs)


def test_cli_prints_json(capsys):
  speed = host_speed.main(["--stream-mib", "2", "--matmul-n", "32", "--repeats", "1", "--json"])
  assert json.loads(capsys.readouterr().out) == speed
  with pytest.raises(SystemExit):
    host_speed.main(["--stream-mib", "0"])
