"""Shared test helpers: a tiny CNN that is NOT an mgtrain model, and data.

It also sets, for every test process and the CLI subprocesses they start,
``--xla_backend_optimization_level=0`` in ``XLA_FLAGS`` unless that flag is
already there. The suite compiles hundreds of programs and runs each on tiny
inputs, so its time is mostly XLA compiling. The flag turns off LLVM's
optimisation of XLA's generated fusion kernels only: every HLO pass (fusion,
layouts, simplification) still runs, and convolutions and dots still call
their libraries. On 2 cores the whole suite took 6 min 18 s and 6 min 19 s
with the default level 2, 5 min 13 s with level 1 and 3 min 47 s with level 0
(2026-12-04, same results). A user's training run should keep the default: at
level 0 the UNet's 64^2 MGE step ran 4x slower (docs/benchmark_cpu.md). To
test at the level users run, set ``XLA_FLAGS=--xla_backend_optimization_level=2``.

Each test process also gets JAX's persistent compilation cache in a fresh
temporary directory of its own, caching every program
(``JAX_COMPILATION_CACHE_DIR``, minimum compile time 0), removed when the
process exits. Many tests compile the same small programs again (a tiny
denoiser's step under another option, the same ResNet smoke step), and a
second compile of the same HLO becomes a load. The directory starts empty,
so nothing from an earlier run or from a user's own cache is read. The CLI
subprocesses and notebook kernels a test starts inherit it (one at a time:
the test waits for them), except where a CLI is given ``--compile-cache``:
a directory of its own, or ``''`` for a cold compile, which turns JAX's cache
off (``experiments.runtime.enable_compilation_cache``). On 2 cores,
``tests/test_split_step.py``, ``test_full_multiscale.py`` and ``test_mge.py``
in one process took 136 s and 130 s without it, 111 s and 102 s with it
(alternating runs, 2026-12-06). ``MGTRAIN_TEST_COMPILATION_CACHE=0``
compiles everything afresh.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

_CACHE_DIR = None
if os.environ.get("MGTRAIN_TEST_COMPILATION_CACHE", "1") != "0":
  # One directory per pytest process: xdist's workers would otherwise write
  # the same entries at once, and JAX writes a cache file in place.
  _CACHE_DIR = tempfile.mkdtemp(prefix="mgtrain-test-xla-cache-")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import flax.linen as nn  # noqa: E402  (XLA reads XLA_FLAGS when its backend starts)
import jax
import jax.numpy as jnp
import pytest

if _CACHE_DIR is not None:
  # JAX reads its environment when it is imported; a plugin may have been first.
  jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


class TinyCNN(nn.Module):
  """A plain Flax CNN defined outside mgtrain (checks the API is model-agnostic)."""

  features: int = 4

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.features, (3, 3), padding="SAME")(x)
    h = nn.tanh(h)
    return nn.Conv(x.shape[-1], (3, 3), padding="SAME")(h)


def smooth_images(key, n, size, channels=1):
  """Smooth random images: a few low-frequency sinusoids per sample."""
  k1, k2 = jax.random.split(key)
  coef = jax.random.normal(k1, (n, 3, 3, channels))
  phase = jax.random.uniform(k2, (n, 3, 3, channels)) * 2 * jnp.pi
  x = (jnp.arange(size) + 0.5) / size
  out = 0.0
  for a in range(3):
    for b in range(3):
      wave = jnp.cos(2 * jnp.pi * (a * x[:, None] + b * x[None, :])[None, :, :, None]
                     + phase[:, None, None, a, b, :])
      out = out + coef[:, None, None, a, b, :] * wave
  return out


def tiny_denoising_problem(size=16, levels=2, base_batch=1, subsample="coarsen"):
  """``(hierarchy, params, pool, sample_fn, loss_fn)``: TinyCNN denoising
  smooth images, with a per-sample loss, for train-step tests."""
  from mgtrain.hierarchy import Hierarchy   # pylint: disable=g-import-not-at-top
  model = TinyCNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)))
  pool = smooth_images(jax.random.key(1), 32, size)

  def sample_fn(data, key, n):
    k1, k2 = jax.random.split(key)
    y = data[jax.random.randint(k1, (n,), 0, data.shape[0])]
    return {"x": y + 0.2 * jax.random.normal(k2, y.shape), "y": y}

  h = Hierarchy(levels=levels, size=size, base_batch=base_batch, subsample=subsample)
  return h, params, pool, sample_fn, mse_loss_fn(model)


_CACHE_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
                   "jax_persistent_cache_min_compile_time_secs",
                   "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(autouse=True)
def _compilation_cache_settings_restored():
  """A CLI's ``main`` run in-process sets JAX's cache for the whole process
  (``--compile-cache ''`` turns it off); the next test gets the suite's back."""
  before = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
  yield
  for name, value in before.items():
    if getattr(jax.config, name) != value:
      jax.config.update(name, value)


@pytest.fixture
def tiny_model():
  model = TinyCNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  return model, params


@pytest.fixture
def run_device_checks(tmp_path):
  """Runs ``experiments/device_checks.sh PART`` in smoke mode on CPU, with
  ``$OUT`` and ``$WORK`` under ``tmp_path``; extra keywords become environment
  variables. Returns the finished process."""
  script = REPO / "experiments" / "device_checks.sh"

  def run(*args, **env):
    full_env = {**os.environ, "CONFIG": "smoke", "DEVICE": "cpu", "OUT": str(tmp_path / "out"),
                "WORK": str(tmp_path / "work"),
                # The script runs `python3`; make it this interpreter's.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                **env}
    return subprocess.run(["bash", str(script), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=600)

  return run


def mse_loss_fn(model):
  def loss_fn(params, batch):
    pred = model.apply(params, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2, axis=(1, 2, 3))
  return loss_fn
