"""experiments.runtime: the CPU XLA flags the CLIs add, and their opt-outs."""

import os
from pathlib import Path

import pytest

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
  ynn = [f for f in flags if f.startswith("--xla_cpu_experimental_ynn_fusion_type=")]
  if runtime.ynn_reduce_supported():
    assert ynn == ["--xla_cpu_experimental_ynn_fusion_type=reduce"]
  elif runtime._jaxlib_at_least(0, 10):
    assert ynn == ["--xla_cpu_experimental_ynn_fusion_type="]


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


def test_ynn_reduce_support_is_read_from_the_xla_library():
  # The library holds its own flag names; it holds no made-up one.
  holds = runtime._xla_library_holds(b"xla_cpu_experimental_ynn_fusion_type")
  assert holds in (True, None)
  if holds:
    assert runtime._xla_library_holds(b"LIBRARY_FUSION_TYPE_NOT_A_TYPE_mgtrain") is False


def test_version_parse():
  assert runtime._jaxlib_at_least(0, 0)
  assert runtime._jaxlib_at_least(0, 0, 1)
  assert not runtime._jaxlib_at_least(99, 0)


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "MGTRAIN_SYSTEM_MALLOC")}
  env.update(extra)
  return env


def test_huge_pages_env_keeps_user_tunables_and_respects_opt_outs():
  assert runtime.huge_pages_env(_clean_env(MGTRAIN_SYSTEM_MALLOC="1")) is None
  # A hugetlb setting of the user's own (any value) is left alone; so is the
  # re-executed child, which sees the one we set.
  assert runtime.huge_pages_env(_clean_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")) is None
  env = runtime.huge_pages_env(_clean_env(GLIBC_TUNABLES="glibc.malloc.arena_max=2"))
  if env is not None:   # Linux, glibc >= 2.35, THP not off
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + runtime.HUGE_PAGES_TUNABLE
    assert runtime.huge_pages_env(env) is None


def test_experiment_cli_reexecutes_once_with_huge_pages():
  import subprocess
  import sys
  wanted = runtime.huge_pages_env(_clean_env()) is not None
  out = subprocess.run([sys.executable, "-m", "experiments.runtime"], env=_clean_env(),
                       capture_output=True, text=True, check=True).stdout
  assert out.count("GLIBC_TUNABLES=") == 1   # printed once: one re-exec, no loop
  assert (f"GLIBC_TUNABLES={runtime.HUGE_PAGES_TUNABLE}\n" in out) == wanted
  out = subprocess.run([sys.executable, "-m", "experiments.runtime"],
                       env=_clean_env(MGTRAIN_SYSTEM_MALLOC="1"), capture_output=True,
                       text=True, check=True).stdout
  assert "GLIBC_TUNABLES=\n" in out


def test_importing_runtime_outside_a_cli_does_not_reexec(monkeypatch):
  # This test process is pytest, not an experiments CLI: nothing may restart it.
  assert not runtime._running_experiment_cli()
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  runtime.maybe_reexec_with_huge_pages()   # returns (jax is imported here anyway)


def test_use_device_without_that_platform_exits_with_one_line():
  import subprocess
  import sys
  import jax
  if any(d.platform == "gpu" for d in jax.devices()):
    pytest.skip("this machine has a GPU")
  code = "from experiments import runtime; runtime.use_device('gpu')"
  proc = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True,
                        text=True, cwd=Path(__file__).resolve().parents[1])
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("--device gpu: JAX has no gpu here")
  assert "Traceback" not in proc.stderr


def test_first_signal_asks_to_stop_and_a_second_sigint_interrupts(capsys):
  import signal
  import threading
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers need the main thread")
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with runtime.stop_on_signal() as stop:
    assert not stop.is_set()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.wait(5) and stop.signum == signal.SIGTERM
    assert "SIGTERM: stopping after this step" in capsys.readouterr().err
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  with pytest.raises(KeyboardInterrupt):
    with runtime.stop_on_signal() as stop:
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.wait(5) and stop.signum == signal.SIGINT
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(100):   # the handler runs between bytecodes
        threading.Event().wait(0.01)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_cache_limit_from_the_environment():
  assert runtime.cache_max_bytes({}) == 8 * 2**30
  assert runtime.cache_max_bytes({"MGTRAIN_CACHE_MAX_GB": "0.5"}) == 2**29
  for bad in ("0", "-1", "x", "inf"):
    with pytest.raises(SystemExit, match="MGTRAIN_CACHE_MAX_GB must be a positive number"):
      runtime.cache_max_bytes({"MGTRAIN_CACHE_MAX_GB": bad})
  cache = runtime.step_cache("/tmp/somewhere")
  assert cache.max_bytes == runtime.cache_max_bytes()
  assert cache.source_packages == ("mgtrain", "experiments")
  assert runtime.step_cache("") is None


@pytest.mark.parametrize("off", [True, False])
def test_compile_cache_off_means_off_even_with_jax_cache_dir_set(tmp_path, off):
  """``--compile-cache ''`` is a cold compile even where the environment names
  a JAX cache (JAX_COMPILATION_CACHE_DIR): nothing is written to it. Without
  the call, the same program lands in that cache, as JAX does."""
  import subprocess
  import sys
  cache = tmp_path / "env_cache"
  code = ("from experiments import runtime; "
          + ("runtime.enable_compilation_cache(''); " if off else "")
          + "import jax; jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()")
  env = _clean_env(JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  subprocess.run([sys.executable, "-c", code], env=env, check=True,
                 cwd=Path(__file__).resolve().parents[1])
  entries = list(cache.glob("*")) if cache.exists() else []
  assert bool(entries) != off
