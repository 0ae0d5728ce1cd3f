"""experiments.timing: awaited calls, warm-up calls kept out, medians, bad counts."""

import pytest

from experiments import timing


class _Clock:
  """A fake ``time.perf_counter``: the timed function moves it on, so each
  call's measured seconds are known exactly."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_median_of_the_timed_calls_after_the_warmup(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(timing.time, "perf_counter", clock)
  durations = iter([100.0, 50.0, 3.0, 1.0, 2.0])   # two warm-up calls, then three timed
  calls = []

  def fn():
    calls.append(1)
    clock.now += next(durations)
    return 0

  median, times = timing.median_seconds(fn, repeats=3, warmup=2)
  assert len(calls) == 5
  assert times == [3.0, 1.0, 2.0] and median == 2.0


def test_seconds_awaits_the_result(monkeypatch):
  awaited = []
  monkeypatch.setattr(timing.jax, "block_until_ready", lambda x: awaited.append(x) or x)
  assert timing.seconds(lambda: "result") >= 0
  assert awaited == ["result"]


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"repeats": 2.0}, {"repeats": 1, "warmup": -1}])
def test_bad_counts_are_refused(kwargs):
  with pytest.raises(ValueError, match="integer"):
    timing.median_seconds(lambda: 0, **kwargs)
