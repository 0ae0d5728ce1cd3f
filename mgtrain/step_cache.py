"""Compiled train steps kept on disk, so a later process skips tracing too.

JAX's persistent compilation cache stores compiled programs, but a new
process still traces and lowers the step before it can look one up: for the
UNet's 4-level MGE step at 64^2 on the 2-core CPU that is 6-7 s of a 14 s
warm start (``docs/benchmark_cpu.md``). A :class:`StepCache` stores the
compiled executable itself (``jax.experimental.serialize_executable``) under a
fingerprint of the program, and a later process with the same fingerprint
loads it without tracing anything.

The catch is that the fingerprint cannot come from the trace it skips.
It is the SHA-256 of

* ``key``: the caller's description of everything the traced function
  closes over that is not an argument (model, loss, optimizer, schedule,
  stage). **Two programs that differ in anything not named in ``key`` or
  below will collide**, so build it from the config objects, e.g.
  ``repr(config)``;
* the source of the packages in ``source_packages`` (default ``mgtrain``;
  the experiment CLIs add ``experiments``), so editing the code invalidates
  every entry;
* jax and jaxlib versions, the backend's platform and version, the devices'
  kinds and count, and ``XLA_FLAGS``;
* the arguments' tree structure, shapes, dtypes, weak types and shardings.

On a load the argument structure is checked again (``jax.stages.Compiled``
refuses arguments that differ from what it was compiled for). An entry that
fails to load (another jaxlib, a truncated file) is compiled afresh and
overwritten. Entries are pickles: only point a cache at a directory you
trust, as with JAX's own cache.

With JAX's persistent compilation cache on as well, a miss here can be a
hit there, and on jax 0.10's CPU backend an executable that JAX loaded
from its cache serializes *without its kernels*: a later process loads the
entry and fails at the first call with ``Function slice_add_fusion not found``
(seen 2026-12-05 after a source edit: the step cache missed, JAX's did
not). So :meth:`StepCache.compile` and :meth:`StepCache.compile_and_store`
watch JAX's cache-hit event in their own thread, and when JAX's cache
served the program they compile it once more, past JAX's cache (an
explicit default XLA option changes JAX's key, and nothing is written
back), and store that.

Example::

  cache = StepCache("~/.cache/mgtrain/step-cache")
  compiled, hit = cache.compile(jax.jit(step, donate_argnums=0), state, batch,
                                key=f"denoise {config!r} stage {stage!r}")
  state, metrics = compiled(state, batch)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import pickle
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import jax
from jax._src import config as jax_config
from jax.experimental import serialize_executable

_FORMAT = 1

# JAX's persistent-cache hits, counted per thread (the event fires in the
# compiling thread; a Full-Multiscale run compiles its next stage in another).
_JAX_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_jax_cache_hits = threading.local()
_listening = threading.Lock()
_listener_registered = False
# An XLA option at its default value: compiling with it changes the key
# JAX's persistent cache looks up, and nothing else.
_PAST_JAX_CACHE = {"xla_embed_ir_in_executable": False}


def _count_jax_cache_hit(event: str, **_) -> None:
  if event == _JAX_CACHE_HIT_EVENT:
    _jax_cache_hits.count = getattr(_jax_cache_hits, "count", 0) + 1


def _no_jax_cache_writes():
  """This thread's compiles are not written to JAX's persistent cache."""
  state = getattr(jax_config, "persistent_cache_min_compile_time_secs", None)
  return state(float("inf")) if state is not None else contextlib.nullcontext()


def _compile_whole(lowered, compiler_options: dict | None = None):
  """``lowered.compile(compiler_options)``, in a form that serializes whole.

  When JAX's persistent cache serves the compile, the program is compiled
  once more past that cache (see the module docstring).
  """
  hits = jax_cache_hits_in_this_thread()
  compiled = lowered.compile(compiler_options=compiler_options or None)
  if jax_cache_hits_in_this_thread() != hits:
    with _no_jax_cache_writes():
      compiled = lowered.compile(compiler_options={**(compiler_options or {}),
                                                   **_PAST_JAX_CACHE})
  return compiled


def jax_cache_hits_in_this_thread() -> int:
  """How often JAX's persistent compilation cache served a compile in this thread."""
  global _listener_registered
  with _listening:
    if not _listener_registered:
      jax.monitoring.register_event_listener(_count_jax_cache_hit)
      _listener_registered = True
  return getattr(_jax_cache_hits, "count", 0)


@lru_cache(maxsize=None)
def source_fingerprint(packages: tuple[str, ...]) -> str:
  """SHA-256 over every ``.py`` file of ``packages`` (path and content)."""
  h = hashlib.sha256()
  for name in packages:
    module = importlib.import_module(name)
    files = getattr(module, "__path__", None)
    roots = [Path(p) for p in files] if files else [Path(module.__file__)]
    for root in roots:
      paths = sorted(root.rglob("*.py")) if root.is_dir() else [root]
      for path in paths:
        h.update(f"{name}/{path.relative_to(root.parent)}".encode())
        h.update(path.read_bytes())
  return h.hexdigest()


def _argument_signature(args) -> str:
  leaves, treedef = jax.tree.flatten(args)
  parts = [str(treedef)]
  for leaf in leaves:
    aval = jax.typeof(leaf)
    sharding = getattr(leaf, "sharding", None)
    parts.append(f"{aval.str_short()} weak={aval.weak_type} {sharding}")
  return "\n".join(parts)


def _environment_signature() -> str:
  import jaxlib  # pylint: disable=g-import-not-at-top
  backend = jax.devices()[0].client
  kinds = sorted({d.device_kind for d in jax.devices()})
  return (f"format={_FORMAT} jax={jax.__version__} jaxlib={jaxlib.__version__} "
          f"platform={backend.platform} {backend.platform_version} devices={len(jax.devices())} "
          f"{kinds} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")


def _execution_device_ids(compiled) -> list[int]:
  """The devices ``compiled`` runs on, in its device assignment's order
  (a mesh-sharded step runs on the mesh's devices, not necessarily all)."""
  for sharding in jax.tree.leaves(compiled.input_shardings):
    assignment = getattr(sharding, "_device_assignment", None)
    if assignment:
      return [d.id for d in assignment]
  return [jax.devices()[0].id]


class StepCache:
  """A directory of serialized compiled steps; see the module docstring.

  Args:
    directory: where entries live (created on the first store).
    source_packages: packages whose source goes into every fingerprint.
    max_bytes: the most the directory's entries may take together (None: no
      limit). Every source edit or jax upgrade leaves all older entries
      unreachable, and a UNet's step takes tens of MB, so after a store the
      least recently used entries (by modification time, which a load
      renews) are deleted until the rest fit; the entry just stored stays.
  """

  def __init__(self, directory: str | os.PathLike,
               source_packages: Sequence[str] = ("mgtrain",), max_bytes: int | None = None):
    if not os.fspath(directory):
      raise ValueError("StepCache needs a directory")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
      raise ValueError(f"max_bytes must be None or an integer >= 0, got {max_bytes!r}")
    self.directory = Path(directory).expanduser()
    self.source_packages = tuple(source_packages)
    self.max_bytes = max_bytes
    self._in_memory = {}   # fingerprint -> Compiled, so a process loads each entry once

  def fingerprint(self, key: str, *args) -> str:
    """The hex digest an entry for ``key`` and these arguments is stored under."""
    if not isinstance(key, str) or not key:
      raise ValueError("StepCache needs a non-empty key describing the program "
                       "(model, loss, optimizer, schedule): it cannot see inside the function")
    h = hashlib.sha256()
    for part in (key, source_fingerprint(self.source_packages), _environment_signature(),
                 _argument_signature(args)):
      h.update(part.encode())
      h.update(b"\0")
    return h.hexdigest()

  def path(self, key: str, *args) -> Path:
    return self._entry(self.fingerprint(key, *args))

  def _entry(self, fingerprint: str) -> Path:
    return self.directory / f"{fingerprint}.step"

  def load(self, key: str, *args):
    """The cached ``jax.stages.Compiled`` for ``key`` and ``args``, or None."""
    return self._read(self.path(key, *args), args)

  def size_bytes(self) -> int:
    """What the directory's entries take together."""
    return sum(size for _, size, _ in self._entries())

  def _entries(self) -> list[tuple[float, int, Path]]:
    """``(mtime, bytes, path)`` of every entry, least recently used first."""
    out = []
    for path in self.directory.glob("*.step"):
      try:
        st = path.stat()
      except OSError:   # deleted by another process meanwhile
        continue
      out.append((st.st_mtime, st.st_size, path))
    return sorted(out)

  def _store(self, compiled, path: Path) -> None:
    """Writes an entry, then deletes the least recently used others while
    the entries take more than ``max_bytes``."""
    if self._write(compiled, path) is None or self.max_bytes is None:
      return
    entries = self._entries()
    total = sum(size for _, size, _ in entries)
    for _, size, old in entries:
      if total <= self.max_bytes:
        break
      if old == path:
        continue
      try:
        old.unlink()
      except OSError:
        continue
      total -= size

  def compile_and_store(self, lowered, key: str, *args,
                        compiler_options: dict | None = None):
    """Compiles ``lowered`` (a ``jax.stages.Lowered`` of ``args``) and stores
    it under ``key`` and ``args``; returns the compiled program. For callers
    that lower the program themselves (to time tracing apart, or to compile
    several programs side by side); :meth:`compile` does both steps. There
    is no public store of an already compiled program: one that JAX's
    persistent cache served would be stored without its kernels (module
    docstring)."""
    compiled = _compile_whole(lowered, compiler_options)
    self._store(compiled, self.path(key, *args))
    return compiled

  @staticmethod
  def _read(path: Path, args):
    try:
      blob = path.read_bytes()
    except OSError:
      return None
    try:
      serialized, in_tree, out_tree, device_ids = pickle.loads(blob)
      if in_tree != jax.tree.structure((args, {})):
        return None
      by_id = {d.id: d for d in jax.devices()}
      compiled = serialize_executable.deserialize_and_load(
          serialized, in_tree, out_tree,
          execution_devices=[by_id[i] for i in device_ids])
    except Exception:  # pylint: disable=broad-except
      # Another jaxlib's format, or a file cut short: compile it again.
      return None
    with contextlib.suppress(OSError):
      os.utime(path)   # recently used: the size limit deletes it last
    return compiled

  @staticmethod
  def _write(compiled, path: Path) -> Path | None:
    try:
      serialized, in_tree, out_tree = serialize_executable.serialize(compiled)
    except (ValueError, NotImplementedError):
      return None
    blob = pickle.dumps((serialized, in_tree, out_tree, _execution_device_ids(compiled)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(blob)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
    return path

  def compile(self, jitted, *args, key: str, compiler_options: dict | None = None):
    """``(compiled, hit)``: the cached program for ``args``, or
    ``jitted.lower(*args).compile()`` stored for next time.

    ``jitted`` is a ``jax.jit``-wrapped function; ``args`` are its positional
    arguments (arrays or ``jax.ShapeDtypeStruct``s with the shardings they
    will have).
    """
    if compiler_options:
      key = f"{key}\ncompiler_options={sorted(compiler_options.items())}"
    fingerprint = self.fingerprint(key, *args)
    if fingerprint in self._in_memory:
      return self._in_memory[fingerprint], True
    compiled = self._read(self._entry(fingerprint), args)
    hit = compiled is not None
    if not hit:
      compiled = _compile_whole(jitted.lower(*args), compiler_options)
      self._store(compiled, self._entry(fingerprint))
    self._in_memory[fingerprint] = compiled
    return compiled, hit


# LLVM's optimisation level for the fusion kernels of one-off programs on CPU.
ONE_OFF_CPU_OPTIMIZATION_LEVEL = 1


def one_off_compiler_options(platform: str) -> dict:
  """XLA compile options for programs that run once and briefly: the
  initialiser and the train-state builder (:func:`cached_call`).

  On CPU, LLVM optimises their fusion kernels at level 1, not XLA's default
  2. The reference UNet's jitted initialiser at 64^2 (mostly threefry and
  its conversions to normals) compiled in 2.9 s instead of 6.1 s, ran in
  37 instead of 20 ms, and gave bitwise the same 2,537,187 parameters.
  Level 0 compiled in 2.2 s but changed 64,020 of them by 1-2 ulp, so it
  is not used. (Training steps gain no compile time at level 1,
  ``docs/benchmark_cpu.md``, and run 4x slower at level 0.)

  No options on other platforms (not measured there), nor when
  ``XLA_FLAGS`` sets the level itself: that choice (e.g. the test suite's
  level 0, ``tests/conftest.py``) is the user's.

  >>> one_off_compiler_options("gpu")
  {}
  """
  if platform != "cpu" or "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
    return {}
  return {"xla_backend_optimization_level": ONE_OFF_CPU_OPTIMIZATION_LEVEL}


def _platform_of(args) -> str:
  """The platform the arrays in ``args`` live on (committed inputs decide
  where a jitted program runs); the default backend when there are none."""
  for leaf in jax.tree.leaves(args):
    if isinstance(leaf, jax.Array):
      return next(iter(leaf.devices())).platform
  return jax.default_backend()


def cached_call(cache: StepCache | None, jitted, *args, key: str):
  """``jitted(*args)``, compiled through ``cache`` when there is one.

  For the one-off programs of a run's start (initialisation, the train
  state), whose tracing a second run would otherwise repeat. They are
  compiled with :func:`one_off_compiler_options`.
  """
  options = one_off_compiler_options(_platform_of(args))
  if cache is None:
    if not options:
      return jitted(*args)
    return jitted.lower(*args).compile(compiler_options=options)(*args)
  compiled, _ = cache.compile(jitted, *args, key=key, compiler_options=options)
  return compiled(*args)
