"""Process-level setup shared by the experiment CLIs (import before jax).

* ``XLA_FLAGS`` for the CPU backend, each added only when the user's own
  ``XLA_FLAGS`` do not already name it:

  - ``--xla_cpu_experimental_ynn_fusion_type=`` (empty: no YNNPACK fusions).
    jaxlib 0.10 hands convolutions and dots to YNNPACK by default, and on this
    2-core AVX2 CPU those kernels slow down sharply once a batch outgrows the
    caches. XLA's own (Eigen) convolutions do not. The reference ResNet's
    fwd+bwd at 64^2, batch 16, took 8.08 s with YNNPACK and 2.20 s without;
    the 4-level MGE step went from 8.16 s (YNNPACK, chunked batches) to 4.41 s
    (``python -m experiments.levers``, one process). ``MGTRAIN_YNNPACK=1``
    keeps YNNPACK. Only set for jaxlib >= 0.10, where the flag exists (XLA
    aborts on a flag it does not know).
  - ``--xla_cpu_use_onednn=true`` (DESIGN.md section 3; it cut the reference
    ResNet's 64^2 step from 4.25 s to 3.48 s on jax 0.9). ``MGTRAIN_NO_ONEDNN=1``
    leaves it out.

* JAX's persistent compilation cache, so a second run of the same program
  skips most of its compile time.
"""

from __future__ import annotations

import os
from pathlib import Path

_ONEDNN = "--xla_cpu_use_onednn=true"
_NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="


def _jaxlib_at_least(major: int, minor: int) -> bool:
  try:
    from jaxlib import version
  except ImportError:
    return False
  parts = []
  for p in version.__version__.split(".")[:2]:
    digits = "".join(ch for ch in p if ch.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts) >= (major, minor)


def cpu_xla_flags() -> list[str]:
  """The CPU flags :func:`configure_xla_flags` adds (before the user's own)."""
  flags = []
  if not os.environ.get("MGTRAIN_YNNPACK") and _jaxlib_at_least(0, 10):
    flags.append(_NO_YNN)
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


def default_cache_dir() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "mgtrain" / "jax-compilation-cache"


def enable_compilation_cache(path: str | os.PathLike | None) -> None:
  """Turns on JAX's persistent compilation cache at ``path`` (None: off)."""
  if not path:
    return
  import jax
  Path(path).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.fspath(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


configure_xla_flags()
