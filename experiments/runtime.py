"""Process-level setup shared by the experiment CLIs (import before jax).

* ``XLA_FLAGS``: on CPU, ``--xla_cpu_use_onednn=true`` (DESIGN.md section 3:
  it cut the reference ResNet's 64^2 step from 4.25 s to 3.48 s; measured
  here on the cpu denoising config: single-scale 2.32 -> 1.92 s/step, MGE
  0.35 -> 0.21 s/step). A user's own ``XLA_FLAGS`` are kept; the flag is only
  added when absent. ``MGTRAIN_NO_ONEDNN=1`` turns it off.
* JAX's persistent compilation cache, so a second run of the same program
  skips most of its compile time.
"""

from __future__ import annotations

import os
from pathlib import Path

_ONEDNN = "--xla_cpu_use_onednn=true"


def configure_xla_flags() -> None:
  if os.environ.get("MGTRAIN_NO_ONEDNN"):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_use_onednn" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " " + _ONEDNN).strip()


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
