"""experiments.runtime: the CPU XLA flags the CLIs add, and their opt-outs."""

import os

from experiments import runtime


def test_flags_added_once_and_user_flags_kept(monkeypatch):
  monkeypatch.delenv("MGTRAIN_YNNPACK", raising=False)
  monkeypatch.delenv("MGTRAIN_NO_ONEDNN", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  runtime.configure_xla_flags()
  runtime.configure_xla_flags()
  flags = os.environ["XLA_FLAGS"].split()
  assert flags[0] == "--xla_force_host_platform_device_count=8"
  assert flags.count("--xla_cpu_use_onednn=true") == 1
  if runtime._jaxlib_at_least(0, 10):
    assert flags.count("--xla_cpu_experimental_ynn_fusion_type=") == 1


def test_a_users_own_setting_wins(monkeypatch):
  monkeypatch.delenv("MGTRAIN_YNNPACK", raising=False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot "
                     "--xla_cpu_use_onednn=false")
  runtime.configure_xla_flags()
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_experimental_ynn_fusion_type=individual_dot "
                                     "--xla_cpu_use_onednn=false")


def test_opt_outs(monkeypatch):
  monkeypatch.setenv("MGTRAIN_YNNPACK", "1")
  monkeypatch.setenv("MGTRAIN_NO_ONEDNN", "1")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert runtime.cpu_xla_flags() == []
  runtime.configure_xla_flags()
  assert os.environ["XLA_FLAGS"] == ""


def test_version_parse():
  assert runtime._jaxlib_at_least(0, 0)
  assert not runtime._jaxlib_at_least(99, 0)
