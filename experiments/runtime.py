"""Process-level setup shared by the experiment CLIs (import before jax).

* ``XLA_FLAGS`` for the CPU backend, each added only when the user's own
  ``XLA_FLAGS`` do not already name it:

  - ``--xla_cpu_experimental_ynn_fusion_type=reduce``: YNNPACK for
    reductions only. jaxlib 0.10 can hand convolutions and dots to YNNPACK,
    and on this 2-core AVX2 CPU those kernels slow down sharply once a batch
    outgrows the caches; XLA's own (Eigen) convolutions do not. The
    reference ResNet's fwd+bwd at 64^2, batch 16, took 8.08 s with YNNPACK
    convs and dots and 2.20 s without; the 4-level MGE step went from 8.16 s
    to 4.41 s (``python -m experiments.levers``, one process). Reductions are
    the other way round: XLA's CPU backend rewrites a large sum into a
    ``reduce-window`` tree that runs slowly (a bias gradient, ``sum`` over
    ``(N, H, W)`` of ``f32[16,64,64,128]``: 11.0 ms), YNNPACK's reduction
    takes 2.2 ms, and its float32 result was closer to a float64 sum
    (8e-8 relative, 240 x 64^2 x 128 values). On the benchmark's ResNet steps
    at 64^2 (two processes per setting, interleaved, 2026-12-04) single b16
    took 0.66 / 0.75 s against 0.83 / 0.88 s, the 4-level MGE step
    1.70 / 1.94 s against 2.06 / 2.14 s, single b240 11.4 / 13.0 s against
    13.3 / 14.6 s. ``MGTRAIN_YNNPACK=1`` leaves XLA's own default instead.
    XLA aborts on a value it does not know, so ``reduce`` is only set where
    jaxlib's XLA library holds the name (:func:`ynn_reduce_supported`);
    otherwise the list is empty (no YNNPACK fusions), as before.
  - ``--xla_cpu_use_onednn=true`` (DESIGN.md section 3; it cut the reference
    ResNet's 64^2 step from 4.25 s to 3.48 s on jax 0.9). ``MGTRAIN_NO_ONEDNN=1``
    leaves it out.

* Transparent huge pages for malloc (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``).
  XLA's CPU runtime allocates every big buffer (activations, the step's
  scratch) with glibc's ``posix_memalign``, which maps fresh memory for
  blocks above 32 MB and returns it on free, so each call faults every
  4 KiB page in again. On this 2-core machine that fault cost is larger than
  the work for memory-bound ops: ``jit(lambda v: v * 2)`` on a 134 MB array
  took 43 ms, 5 ms with the output donated, and 9 ms with the tunable (2 MiB
  pages). The reference ResNet's steps at 64^2 (same process kind, one run
  each): single b16 0.97 -> 0.78 s, 4-level MGE 2.26 -> 1.98 s, single b240
  17.2 -> 13.5 s, with the same peak RSS. glibc reads the tunable only at
  start-up, so an experiment CLI (``python -m experiments.X``) that finds it
  unset re-executes itself once with it set (:func:`maybe_reexec_with_huge_pages`),
  before jax is imported. ``MGTRAIN_SYSTEM_MALLOC=1`` opts out. Your own
  program gets the same by starting Python with that variable set.

  Measured and *not* made the default: keeping freed memory in the process
  (``glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=281474976710655:glibc.malloc.arena_max=1``,
  so nothing is faulted in again after the first step). Two runs each
  (2026-12-02, one process per setting, settings interleaved):
  the mesh-free conv's fwd+bwd at 128 channels, 256^2, batch 16 took a
  median 2.5-2.9 s against 6.1-7.3 s with huge pages alone, but the
  4-level ResNet MGE step at 64^2 was not faster (2.11 / 4.65 s against
  2.48 / 1.90 s), compiles took 1.2-1.8x longer (one arena serialises
  malloc across XLA's threads), and peak RSS rose from 4.7 GB to 8.7 GB
  (fragmentation, which matters at 256^2 in 24 GB). Without
  ``arena_max=1`` the gain vanished. For an MFC-heavy job with memory to
  spare, set that ``GLIBC_TUNABLES`` yourself; it wins over ours.
  With synchronous dispatch (``JAX_CPU_ENABLE_ASYNC_DISPATCH=false``) XLA
  allocates on the calling thread, in glibc's main arena, so the tunables
  keep its buffers without ``arena_max=1``. The 3x3 conv layer at 256^2
  then had no page faults, but the ResNet steps at 64^2 were no faster (two
  runs each, docs/benchmark_cpu.md), and the MFC keeps faulting in DUCC's
  own ``irfft2`` scratch, which comes from a pool worker's arena.

  Why fresh memory costs so much on the machine these figures come from:
  it is a Firecracker VM whose kernel reports free pages to the host
  (``page_reporting.page_reporting_order=11``), so memory the guest has
  kept free for a moment goes back to the host, and touching it again
  faults on the host. Touching a fresh 6 GB numpy array took 41.7 s
  (150 MB/s). ``perf`` puts 70% of the UNet MGE program's first step (64^2,
  7.45 s; later steps 2.1-2.2 s) in the kernel's ``clear_page_erms``; right
  after that 6 GB array was freed, the same first step took 2.06 s. On a
  bare-metal host these faults, and so these levers, matter far less.
* JAX's persistent compilation cache, so a second run of the same program
  skips most of its compile time.
* A graceful stop (:func:`stop_on_signal`): the first Ctrl-C or SIGTERM of
  a training run ends it after the step in flight, with a checkpoint to
  resume from; a second Ctrl-C stops at once.

``python -m experiments.runtime`` prints what this process set up.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import mmap
import os
import platform
import signal
import sys
import threading
from pathlib import Path

_ONEDNN = "--xla_cpu_use_onednn=true"
_NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
_YNN_REDUCE = "--xla_cpu_experimental_ynn_fusion_type=reduce"


def _jaxlib_at_least(major: int, minor: int, patch: int = 0) -> bool:
  try:
    from jaxlib import version
  except ImportError:
    return False
  parts = []
  for p in (version.__version__.split(".") + ["0", "0"])[:3]:
    digits = "".join(ch for ch in p if ch.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts) >= (major, minor, patch)


def _xla_library_holds(name: bytes) -> bool | None:
  """Whether jaxlib's XLA library (``libjax_common.so``) contains ``name``.

  Looks without importing jaxlib (this runs before jax is imported): an
  ``mmap`` search, about 10 ms. ``None`` when the library is not where
  jaxlib 0.10 keeps it.
  """
  spec = importlib.util.find_spec("jaxlib")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    lib = Path(folder) / "libjax_common.so"
    if lib.is_file():
      with open(lib, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(name) >= 0
  return None


def ynn_reduce_supported() -> bool:
  """Whether this jaxlib's XLA accepts ``--xla_cpu_experimental_ynn_fusion_type=reduce``.

  XLA aborts the process on an enum value it does not know, so the value is
  only used where the library holds its name (``LIBRARY_FUSION_TYPE_REDUCE``),
  or, where the library cannot be searched, from jaxlib 0.10.2 on (the
  version measured).
  """
  if not _jaxlib_at_least(0, 10):
    return False
  holds = _xla_library_holds(b"LIBRARY_FUSION_TYPE_REDUCE")
  return _jaxlib_at_least(0, 10, 2) if holds is None else holds


def cpu_xla_flags() -> list[str]:
  """The CPU flags :func:`configure_xla_flags` adds (before the user's own)."""
  flags = []
  if not os.environ.get("MGTRAIN_YNNPACK") and _jaxlib_at_least(0, 10):
    flags.append(_YNN_REDUCE if ynn_reduce_supported() else _NO_YNN)
  if not os.environ.get("MGTRAIN_NO_ONEDNN"):
    flags.append(_ONEDNN)
  return flags


def configure_xla_flags() -> None:
  """Adds :func:`cpu_xla_flags` to ``XLA_FLAGS``, keeping every flag the user set."""
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in cpu_xla_flags():
    name = flag.split("=")[0].lstrip("-")
    if name not in flags:
      flags = (flags + " " + flag).strip()
  os.environ["XLA_FLAGS"] = flags


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_with_hugetlb() -> bool:
  """True on glibc >= 2.35, the first release with ``glibc.malloc.hugetlb``."""
  libc, version = platform.libc_ver()
  if libc != "glibc":
    return False
  try:
    major, minor = (int(p) for p in version.split(".")[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def _transparent_huge_pages_usable() -> bool:
  """THP is ``always`` or ``madvise`` (the tunable madvises), not ``never``."""
  try:
    setting = _THP_SETTING.read_text()
  except OSError:
    return False
  return "[never]" not in setting


def huge_pages_env(environ=None) -> dict | None:
  """The environment to re-execute with, or None when nothing is to be done.

  None when the user opted out (``MGTRAIN_SYSTEM_MALLOC``), when
  ``GLIBC_TUNABLES`` already names ``glibc.malloc.hugetlb`` (their setting
  wins, and the re-executed process stops here), or when the platform has no
  use for it (not Linux, not glibc >= 2.35, THP off). Other tunables the
  user set are kept.
  """
  environ = os.environ if environ is None else environ
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (environ.get("MGTRAIN_SYSTEM_MALLOC") or "glibc.malloc.hugetlb" in tunables
      or not sys.platform.startswith("linux") or not _glibc_with_hugetlb()
      or not _transparent_huge_pages_usable()):
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t)
  return env


def _running_experiment_cli() -> bool:
  """``python -m experiments.X``: the main module is one of the experiment CLIs.

  Imported from a notebook, a test or a user's script, this module never
  re-executes anything.
  """
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  return bool(spec and spec.name.startswith("experiments."))


def maybe_reexec_with_huge_pages() -> None:
  """Re-executes an experiment CLI once with :data:`HUGE_PAGES_TUNABLE` set.

  Runs before jax is imported, so the restart costs only Python's start-up.
  The child sees the tunable and goes on without restarting again.
  """
  if "jax" in sys.modules or not _running_experiment_cli():
    return
  env = huge_pages_env()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def default_cache_dir() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "mgtrain" / "jax-compilation-cache"


def default_step_cache_dir() -> Path:
  """Where the CLIs keep compiled train steps (:mod:`mgtrain.step_cache`)."""
  return default_cache_dir().parent / "step-cache"


DEFAULT_CACHE_MAX_GB = 8.0


def cache_max_bytes(environ=None) -> int:
  """The size limit of each of the CLIs' two caches, in bytes.

  ``MGTRAIN_CACHE_MAX_GB`` (GiB, a positive number) or 8 GiB. Each source
  edit or jax upgrade leaves every older entry unreachable, and a UNet's
  step takes tens of MB, so without a limit the caches only grow; past it,
  the least recently used entries go.
  """
  from experiments.cli import positive_float   # pylint: disable=g-import-not-at-top
  environ = os.environ if environ is None else environ
  text = environ.get("MGTRAIN_CACHE_MAX_GB", "")
  try:
    gib = positive_float(text) if text else DEFAULT_CACHE_MAX_GB
  except argparse.ArgumentTypeError as e:
    raise SystemExit(f"MGTRAIN_CACHE_MAX_GB {e} (GiB)") from None
  return int(gib * 2**30)


def step_cache(path: str | os.PathLike | None):
  """The CLIs' :class:`mgtrain.step_cache.StepCache` at ``path`` (None or
  '': none), fingerprinting ``mgtrain`` and ``experiments``, capped at
  :func:`cache_max_bytes`."""
  if not path:
    return None
  from mgtrain.step_cache import StepCache   # pylint: disable=g-import-not-at-top
  return StepCache(path, source_packages=("mgtrain", "experiments"),
                   max_bytes=cache_max_bytes())


def use_device(device: str | None) -> None:
  """Points JAX at ``--device`` (``cpu`` or ``gpu``; None: what JAX finds).

  Exits with one line when that platform has no backend here: JAX itself
  fails on its next call with a bare ``AssertionError`` (jax 0.10, no CUDA
  plugin installed).
  """
  if not device:
    return
  import jax
  jax.config.update("jax_platforms", "cpu" if device == "cpu" else "cuda")
  try:
    jax.devices()
  except (AssertionError, RuntimeError) as e:
    detail = str(e).splitlines()[0] if str(e) else "no backend could be initialised"
    raise SystemExit(f"--device {device}: JAX has no {device} here ({detail}); "
                     "install jax with that platform's plugin, or leave --device out") from None


@contextlib.contextmanager
def stop_on_signal():
  """Turns the first SIGINT (Ctrl-C) or SIGTERM into a request to stop.

  Yields a :class:`threading.Event` (its ``signum`` says which signal set
  it) for ``mgtrain.full_multiscale.train``'s ``stop_requested``: a run
  stops after the step in flight and checkpoints it, where Python's default
  would drop every step since the last checkpoint (a paper-scale run saves
  every 250 steps). A batch system's SIGTERM before it kills a job gets the
  same treatment. A second SIGINT raises ``KeyboardInterrupt`` at once
  (e.g. during a long compile); a second SIGTERM ends the process as the
  default would. The previous handlers come back on exit. Outside the main
  thread, where Python cannot install handlers, the event is never set.

  Example:
    >>> with stop_on_signal() as stop:
    ...   stop.is_set()
    False
  """
  stop = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield stop
    return

  def handler(signum, frame):
    if stop.is_set():
      signal.signal(signum, previous[signum])
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      os.kill(os.getpid(), signum)
      return
    stop.signum = signum
    stop.set()
    print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
          "to resume from (rerun the same command); send it again to stop at once",
          file=sys.stderr, flush=True)

  previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield stop
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def enable_compilation_cache(path: str | os.PathLike | None) -> None:
  """Turns on JAX's persistent compilation cache at ``path`` (None or '': off).

  Capped at :func:`cache_max_bytes` (JAX deletes the least recently used
  entries) where the ``filelock`` package is installed, which JAX's eviction
  needs (torch brings it); without it the cache is not capped.

  Off means off: a process started with ``JAX_COMPILATION_CACHE_DIR`` in its
  environment would otherwise read and write that cache, so a CLI's
  ``--compile-cache ''`` would not give the cold compile its help promises
  (the benchmark's compile times would be loads). Call it before the
  process's first compile: JAX decides once per process whether it uses a
  cache.
  """
  import jax
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  jax.config.update("jax_enable_compilation_cache", True)
  Path(path).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.fspath(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if importlib.util.find_spec("filelock") is not None:
    jax.config.update("jax_compilation_cache_max_size", cache_max_bytes())


maybe_reexec_with_huge_pages()
configure_xla_flags()

if __name__ == "__main__":
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
  print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}")
  print(f"compilation cache default: {default_cache_dir()}")
