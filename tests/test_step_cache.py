"""mgtrain.step_cache: a loaded step is the step that was compiled, and
anything in the fingerprint that changes misses."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TinyCNN, smooth_images
from mgtrain import full_multiscale as fm
from mgtrain.hierarchy import Hierarchy
from mgtrain import step_cache as step_cache_lib
from mgtrain.step_cache import StepCache, one_off_compiler_options, source_fingerprint


def _step(state, x):
  return {"w": state["w"] - 0.1 * jnp.tanh(state["w"] * x.sum())}, jnp.sum(state["w"] ** 2)


def _args():
  return {"w": jnp.linspace(-1.0, 1.0, 8)}, jnp.arange(3.0)


def test_a_second_cache_loads_the_same_donating_program(tmp_path):
  jitted = jax.jit(_step, donate_argnums=0)
  state, x = _args()
  expected_state, expected_loss = jax.jit(_step)(*_args())

  compiled, hit = StepCache(tmp_path).compile(jitted, state, x, key="toy step")
  assert not hit
  assert len(list(tmp_path.glob("*.step"))) == 1

  state, x = _args()
  loaded, hit = StepCache(tmp_path).compile(jitted, state, x, key="toy step")
  assert hit
  new_state, loss = loaded(state, x)
  np.testing.assert_array_equal(new_state["w"], expected_state["w"])
  assert float(loss) == float(expected_loss)
  assert state["w"].is_deleted()            # the donation survived the round trip
  assert len(list(tmp_path.glob("*.step"))) == 1


def test_key_shapes_and_options_are_part_of_the_fingerprint(tmp_path):
  cache = StepCache(tmp_path)
  state, x = _args()
  cache.compile(jax.jit(_step), state, x, key="toy step")
  assert cache.load("another step", state, x) is None
  assert cache.load("toy step", state, jnp.arange(4.0)) is None
  assert cache.load("toy step", state, x.astype(jnp.int32)) is None
  assert cache.load("toy step", {"w": state["w"], "v": state["w"]}, x) is None
  assert cache.load("toy step", state, x) is not None
  _, hit = cache.compile(jax.jit(_step), state, x, key="toy step",
                         compiler_options={"xla_embed_ir_in_executable": True})
  assert not hit


def test_source_edits_change_the_fingerprint(tmp_path, monkeypatch):
  pkg = tmp_path / "pkg_under_test"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("X = 1\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  cache = StepCache(tmp_path / "cache", source_packages=("pkg_under_test",))
  before = cache.fingerprint("k", *_args())
  assert cache.fingerprint("k", *_args()) == before
  (pkg / "__init__.py").write_text("X = 2\n")
  source_fingerprint.cache_clear()
  assert cache.fingerprint("k", *_args()) != before
  sys.modules.pop("pkg_under_test", None)


def test_a_damaged_entry_is_compiled_again(tmp_path):
  cache = StepCache(tmp_path)
  state, x = _args()
  cache.compile(jax.jit(_step), state, x, key="toy step")
  (entry,) = tmp_path.glob("*.step")
  entry.write_bytes(entry.read_bytes()[:100])
  assert cache.load("toy step", state, x) is None
  cache = StepCache(tmp_path)     # a new process: nothing held in memory
  compiled, hit = cache.compile(jax.jit(_step), state, x, key="toy step")
  assert not hit
  assert float(compiled(state, x)[1]) == float(jax.jit(_step)(state, x)[1])
  assert cache.load("toy step", state, x) is not None


def test_one_process_loads_an_entry_once(tmp_path):
  cache = StepCache(tmp_path)
  state, x = _args()
  first, _ = cache.compile(jax.jit(_step), state, x, key="toy step")
  again, hit = cache.compile(jax.jit(_step), state, x, key="toy step")
  assert hit and again is first


def test_cached_init_params_and_fresh_state_equal_the_plain_ones(tmp_path):
  from mgtrain.nn import init_params
  model = TinyCNN()
  x = jnp.zeros((1, 8, 8, 1))
  plain = init_params(model, jax.random.key(3), x)
  cached = [init_params(model, jax.random.key(3), x, step_cache=StepCache(tmp_path))
            for _ in range(2)]
  assert len(list(tmp_path.glob("*.step"))) == 1
  for c in cached:
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(c)):
      np.testing.assert_array_equal(a, b)
  tx = optax.adam(1e-3)
  with pytest.raises(ValueError, match="cache_key"):
    fm.fresh_state(plain, 0, tx, step_cache=StepCache(tmp_path))
  states = [fm.fresh_state(plain, 5, tx, step_cache=StepCache(tmp_path), cache_key="adam 1e-3")
            for _ in range(2)]
  want = fm.fresh_state(plain, 5, tx)
  for s in states:
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(s)):
      np.testing.assert_array_equal(jax.random.key_data(a) if jnp.issubdtype(
          a.dtype, jax.dtypes.prng_key) else a, jax.random.key_data(b) if jnp.issubdtype(
              b.dtype, jax.dtypes.prng_key) else b)


def test_init_on_the_host_cpu_equals_the_plain_init_and_lands_on_the_default_device(tmp_path):
  from mgtrain.nn import init_params
  model = TinyCNN()
  x = jnp.zeros((1, 8, 8, 1))
  plain = init_params(model, jax.random.key(3), x)
  host = [init_params(model, jax.random.key(3), x, on_platform="cpu"),
          *(init_params(model, jax.random.key(3), x, on_platform="cpu",
                        step_cache=StepCache(tmp_path)) for _ in range(2))]
  # Here the host is the default device; on a GPU the values may differ in
  # their last bits, which experiments.first_step's sha256 shows.
  for h in host:
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(h)):
      np.testing.assert_array_equal(a, b)
      assert b.devices() == {jax.devices()[0]}
  # Its own cache entry: a plain init must not load the host-compiled one.
  init_params(model, jax.random.key(3), x, step_cache=StepCache(tmp_path))
  assert len(list(tmp_path.glob("*.step"))) == 2
  with pytest.raises(ValueError, match="cannot initialise on platform 'tpu'"):
    init_params(model, jax.random.key(3), x, on_platform="tpu")


def test_one_off_programs_compile_at_llvm_level_1_on_cpu_unless_xla_flags_say(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_onednn=true")
  assert one_off_compiler_options("cpu") == {"xla_backend_optimization_level": 1}
  assert one_off_compiler_options("gpu") == {}
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  assert one_off_compiler_options("cpu") == {}
  monkeypatch.delenv("XLA_FLAGS")
  assert one_off_compiler_options("cpu") == {"xla_backend_optimization_level": 1}


@pytest.mark.parametrize("cached", [False, True])
def test_init_at_level_1_is_bitwise_the_init_at_xla_default_level(tmp_path, monkeypatch, cached):
  """The initialiser compiled with the one-off options (which reach the
  compile, with or without a step cache) gives bitwise the parameters XLA's
  default level 2 gives."""
  from mgtrain.nn import init_params
  from mgtrain.nn.unet import UNet
  # The test suite sets level 0 in XLA_FLAGS; without it, level 1 applies.
  monkeypatch.setenv("XLA_FLAGS", "")
  seen = []
  compile_lowered = jax.stages.Lowered.compile

  def spy(self, compiler_options=None):
    seen.append(compiler_options)
    return compile_lowered(self, compiler_options=compiler_options)
  monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
  model = UNet(base_channels=8, channel_mult=(1, 2), groups=4, emb_features=16)
  x, t = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,))
  got = init_params(model, jax.random.key(7), x, t,
                    step_cache=StepCache(tmp_path) if cached else None)
  assert seen and seen[0] == {"xla_backend_optimization_level": 1}
  want = jax.jit(functools.partial(model.init)).lower(jax.random.key(7), x, t).compile(
      compiler_options={"xla_backend_optimization_level": 2})(jax.random.key(7), x, t)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)
  assert step_cache_lib._platform_of((jax.random.key(0), x)) == "cpu"


def test_bad_arguments():
  with pytest.raises(ValueError, match="directory"):
    StepCache("")
  with pytest.raises(ValueError, match="non-empty key"):
    StepCache("/tmp/unused").fingerprint("", *_args())


class _CountingCache(StepCache):
  def __init__(self, *a, **kw):
    super().__init__(*a, **kw)
    self.hits = 0
    self.misses = 0

  def compile(self, *a, **kw):
    compiled, hit = super().compile(*a, **kw)
    self.hits += hit
    self.misses += not hit
    return compiled, hit


def _fm_run(**kw):
  size = 16
  model = TinyCNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)))
  pool = smooth_images(jax.random.key(1), 16, size)

  def sample_fn(data, key, n):
    y = data[jax.random.randint(key, (n,), 0, data.shape[0])]
    return {"x": jnp.roll(y, 1, axis=1), "y": y}

  def loss_fn(p, batch):
    return jnp.mean((model.apply(p, batch["x"]) - batch["y"]) ** 2, axis=(1, 2, 3))

  h = Hierarchy(levels=2, size=size, base_batch=1)
  stages = fm.full_multiscale_schedule(h, (2, 1))
  return fm.train(params=params, stages=stages, hierarchy=h, loss_fn=loss_fn,
                  sample_fn=sample_fn, data=pool,
                  make_optimizer=lambda n: optax.adam(optax.cosine_decay_schedule(1e-2, n)),
                  progress=False, **kw)


def test_full_multiscale_second_run_loads_every_stage_and_trains_the_same(tmp_path):
  first_cache = _CountingCache(tmp_path)
  first_state, first = _fm_run(step_cache=first_cache, step_cache_key="tiny adam 1e-2")
  # The train state and both stages' steps.
  assert (first_cache.hits, first_cache.misses) == (0, 3)
  second_cache = _CountingCache(tmp_path)
  second_state, second = _fm_run(step_cache=second_cache, step_cache_key="tiny adam 1e-2")
  assert (second_cache.hits, second_cache.misses) == (3, 0)
  assert second["loss"] == first["loss"]
  _, uncached = _fm_run()
  np.testing.assert_allclose(second["loss"], uncached["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(first_state.params), jax.tree.leaves(second_state.params)):
    np.testing.assert_array_equal(a, b)
  other = _CountingCache(tmp_path)
  _fm_run(step_cache=other, step_cache_key="tiny adam 1e-3")
  assert other.misses == 3


def test_full_multiscale_step_cache_needs_a_key(tmp_path):
  with pytest.raises(ValueError, match="step_cache_key"):
    _fm_run(step_cache=StepCache(tmp_path))


_CROSS_PROCESS = """
import sys
import jax, jax.numpy as jnp
from mgtrain.step_cache import StepCache
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
def f(x):
  return jnp.sin(x[1:] + x[:-1]) * 2.0 + jnp.cos(x).sum()
x = jnp.arange(1000.0)
cache = StepCache(sys.argv[2])
if sys.argv[3] == "compile":
  compiled, hit = cache.compile(jax.jit(f), x, key="cross-process toy")
else:   # load, else lower and compile_and_store: what SplitStep.compile and first_step do
  compiled = cache.load("cross-process toy", x)
  hit = compiled is not None
  if not hit:
    compiled = cache.compile_and_store(jax.jit(f).lower(x), "cross-process toy", x)
print(int(hit), float(compiled(x).sum()), float(jax.jit(f)(x).sum()))
"""


@pytest.mark.parametrize("how", ["compile", "load-then-compile_and_store"])
def test_an_entry_written_after_a_jax_cache_hit_loads_in_a_new_process(tmp_path, how):
  """With JAX's persistent cache on: process 1 fills it (and step cache A);
  process 2 misses step cache B but hits JAX's cache, and must still write
  a complete entry to B; process 3 loads B and runs it. On jax 0.10's CPU
  backend, storing the executable JAX loaded from its cache made process 3
  fail with ``Function ... not found``. Through ``StepCache.compile`` and
  through ``load`` + ``compile_and_store``."""
  import subprocess   # pylint: disable=g-import-not-at-top
  import sys   # pylint: disable=g-import-not-at-top

  def run(step_cache):
    out = subprocess.run([sys.executable, "-c", _CROSS_PROCESS, str(tmp_path / "jax"),
                          str(tmp_path / step_cache), how], capture_output=True, text=True,
                         check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    hit, value, expected = out.stdout.split()
    assert float(value) == float(expected)
    return int(hit)

  assert run("a") == 0
  assert any((tmp_path / "jax").iterdir())     # JAX's cache has the program now
  assert run("b") == 0                          # step cache B misses, JAX's hits
  assert run("b") == 1                          # B's entry loads and runs


def test_size_limit_deletes_the_least_recently_used_entries(tmp_path):
  """Past ``max_bytes`` a store deletes the entries used longest ago; a load
  counts as a use; the entry just stored stays even when it alone is over."""
  import os   # pylint: disable=g-import-not-at-top
  import time   # pylint: disable=g-import-not-at-top
  state, x = _args()
  cache = StepCache(tmp_path)
  keys = ["step a", "step b", "step c"]
  for i, key in enumerate(keys):
    cache.compile(jax.jit(_step), state, x, key=key)
    # Distinct, ordered modification times, whatever the filesystem's resolution.
    os.utime(cache.path(key, state, x), (1_000_000 + i, 1_000_000 + i))
  sizes = {k: cache.path(k, state, x).stat().st_size for k in keys}
  assert cache.size_bytes() == sum(sizes.values())
  # A load from a new cache renews "step a": "step b" is now the oldest.
  limited = StepCache(tmp_path, max_bytes=sizes["step a"] + sizes["step c"] + sizes["step a"])
  assert limited.load("step a", state, x) is not None
  assert cache.path("step a", state, x).stat().st_mtime > time.time() - 60
  limited.compile(jax.jit(_step), state, x, key="step d")
  left = {k for k in keys + ["step d"] if cache.path(k, state, x).exists()}
  assert left == {"step a", "step c", "step d"}   # the same program: equal sizes
  assert limited.size_bytes() <= limited.max_bytes
  # A limit below one entry keeps just the newest.
  tiny = StepCache(tmp_path, max_bytes=1)
  tiny.compile(jax.jit(_step), state, x, key="step e")
  assert [p.name for p in tmp_path.glob("*.step")] == [cache.path("step e", state, x).name]
  with pytest.raises(ValueError, match="max_bytes"):
    StepCache(tmp_path, max_bytes=-1)
