"""A stage's MGE train step as one XLA program per mesh.

:func:`mgtrain.full_multiscale.make_stage_step` jits a whole step (sampling,
every mesh's forward and backward pass, the optimizer) into one program.
That is the fastest step, but one big program is slow to compile and slow
to load: XLA's compile and its executable loading grow faster than linearly
with the program's size. :class:`SplitStep` computes the *same* step as
``L + 2`` programs, run one after another on one device:

* ``prepare(state, data) -> groups``: the step's keys
  (:func:`mgtrain.full_multiscale.step_keys`), every level's batch and the
  per-mesh groups of :func:`mgtrain.mge.mesh_groups` (batches
  ``N_0, N_1 + N_0, ..., N_{L-1} + N_{L-2}``);
* for each mesh ``m``, ``mesh_pass(params, group_m, after) -> (per_term,
  grad)``: :func:`mgtrain.mge.mesh_value_and_grad`, one forward and backward
  pass of the model at that mesh's resolution;
* ``update(state, outputs) -> (state, metrics)``: the sums over the meshes
  (in the one-program step's order) and
  :func:`mgtrain.full_multiscale.apply_gradient`. It donates the state.

The sum is the one-program step's (Eq. 6 regrouped by mesh), so the update
equals it to float rounding (XLA fuses the two programs differently). The
step draws the same samples. ``tx`` must be a
``multiscale(..., level_terms=False)``, as for ``fuse_meshes=True``.

Why: the programs are smaller, so they compile in less total time, can
compile side by side on a machine with idle cores
(:meth:`SplitStep.compile`, ``workers``), and load much faster from
:class:`mgtrain.step_cache.StepCache`. The UNet's 4-level MGE step at 64^2 on
the 2-core CPU (a probe of 2026-12-05, one process each): the whole step
compiled in 64-68 s and its 21 MB executable loaded in 12.6 s; the four
mesh passes compiled in 50-54 s in all (13, 14-16, 15, 9-10 s) and loaded in
4.9 s in all (5, 5, 5 and 3 MB). The price is a few program launches per
step and the per-mesh gradients written out between programs; see
``docs/benchmark_cpu.md`` for the measured step times.

With ``sequential`` each mesh pass starts only after the previous one has
finished (its inputs depend on the previous pass's ``per_term`` through
:func:`mgtrain.mge.sequence_after`), so at most one pass's activations are
alive at a time, as in the one-program step's ``sequential`` mode; chunks
inside a pass (``max_pixels_per_chunk``) follow the same flag.

Example::

  step = SplitStep(stage, hierarchy, loss_fn, sample_fn, tx)
  compiled = step.compile(state, data)          # or call ``step`` directly
  state, metrics = compiled(state, data)
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mgtrain.full_multiscale import Stage, TrainState, apply_gradient, step_keys
from mgtrain.hierarchy import Hierarchy
from mgtrain.mge import level_views, mesh_groups, mesh_value_and_grad, sequence_after


class CompiledSplitStep:
  """The compiled programs of a :class:`SplitStep`; ``(state, data) -> (state, metrics)``.

  Attributes:
    hits: per program (``prepare``, ``mesh 0``, ..., ``update``), whether it
      came from the step cache (all False without one).
    seconds: per program, the seconds spent on it (load, or lowering and
      compile); the programs compile side by side, so these overlap.
    lower_seconds: wall seconds of tracing and lowering (0 when all hit).
    compile_seconds: wall seconds of the cache loads and XLA's compiles.
  """

  def __init__(self, prepare, mesh_passes, update, sequential: bool, hits: dict,
               seconds: dict, lower_seconds: float, compile_seconds: float):
    self._prepare = prepare
    self._sequential = sequential
    self._mesh_passes = list(mesh_passes)
    self._update = update
    self.hits = hits
    self.seconds = seconds
    self.lower_seconds = lower_seconds
    self.compile_seconds = compile_seconds

  @property
  def programs(self) -> dict:
    """The compiled programs (``jax.stages.Compiled``) by name."""
    return {"prepare": self._prepare,
            **{f"mesh {m}": c for m, c in enumerate(self._mesh_passes)},
            "update": self._update}

  def __call__(self, state: TrainState, data):
    return _run(self._prepare, self._mesh_passes, self._update, self._sequential, state, data)


def _run(prepare, mesh_passes, update, sequential: bool, state, data):
  groups = prepare(state, data)
  outputs, after = [], None
  for mesh_pass, group in zip(mesh_passes, groups):
    out = mesh_pass(state.params, group, after)
    outputs.append(out)
    if sequential:
      after = out[0]
  return update(state, outputs)


class SplitStep:
  """One stage's train step as one program per mesh (see the module docstring).

  Calling it jits each program on first use (one after another); use
  :meth:`compile` to compile them ahead, side by side, or through a step
  cache.

  Args:
    stage, hierarchy, loss_fn, sample_fn, tx, max_pixels_per_chunk: as for
      :func:`mgtrain.full_multiscale.make_stage_step` with
      ``fuse_meshes=True``; ``loss_fn`` must return a per-sample ``(B,)``
      loss.
    sequential: each mesh pass (and each chunk inside one) waits for the
      previous, so one pass's activations are alive at a time.
  """

  def __init__(self, stage: Stage, hierarchy: Hierarchy, loss_fn: Callable,
               sample_fn: Callable, tx: optax.GradientTransformation,
               max_pixels_per_chunk: int | None = None, sequential: bool = False):
    self.stage = stage
    self.sequential = sequential
    num_terms = len(stage.levels)
    crops = hierarchy.subsample != "coarsen"

    def prepare(state: TrainState, data):
      keys, k_crop = step_keys(state.rng, state.step, num_terms)
      batches = [sample_fn(data, k, n) for k, n in zip(keys, stage.batch_sizes)]
      views = level_views(batches, hierarchy, stage.levels, k_crop if crops else None)
      return mesh_groups(views)

    def mesh_pass(params, group, after):
      if sequential and after is not None:
        group = sequence_after(group, after)
      return mesh_value_and_grad(loss_fn, params, group, num_terms, max_pixels_per_chunk,
                                 sequential)

    def update(state: TrainState, outputs):
      terms = jnp.zeros((num_terms,), jnp.float32)
      grad = None
      for per_term, g in outputs:   # the one-program step's order of summation
        terms = terms + per_term
        grad = g if grad is None else jax.tree.map(jnp.add, grad, g)
      return apply_gradient(state, stage, tx, grad, terms)

    self._prepare = jax.jit(prepare)
    # One jit; each mesh's group shape traces and compiles its own program.
    self._mesh_pass = jax.jit(mesh_pass)
    self._update = jax.jit(update, donate_argnums=0)

  @property
  def num_meshes(self) -> int:
    return len(self.stage.levels)

  def __call__(self, state: TrainState, data):
    return _run(self._prepare, [self._mesh_pass] * self.num_meshes, self._update,
                self.sequential, state, data)

  def compile(self, state, data, *, step_cache=None, key: str | None = None,
              workers: int | None = None,
              compiler_options: dict | None = None) -> CompiledSplitStep:
    """Compiles the ``L + 2`` programs, ``workers`` at a time (threads).

    ``state`` and ``data`` are arrays or ``jax.ShapeDtypeStruct``s; the
    programs' other inputs are derived with ``jax.eval_shape``. With a
    :class:`mgtrain.step_cache.StepCache` each program is first looked up
    under ``key`` plus its name (``key`` must then describe the stage's
    step, as for :meth:`StepCache.compile`), and the ones it lacks are
    stored once compiled. In three phases: the cache loads (side by side),
    tracing and lowering what was missing (one after another: tracing holds
    Python's lock), then XLA's compiles (side by side: they release it).
    ``workers`` defaults to the number of programs, at most
    ``os.cpu_count()``; on the 2-core CPU, where one XLA compile already
    keeps 1.6 cores busy, side by side saves nothing, but costs nothing
    either. ``compiler_options`` are XLA options for every program.
    """
    if step_cache is not None and not key:
      raise ValueError("SplitStep.compile with a step_cache needs a key describing the step")
    if workers is None:
      workers = min(self.num_meshes + 2, os.cpu_count() or 1)
    if workers < 1:
      raise ValueError(f"workers must be at least 1, got {workers}")
    groups = jax.eval_shape(self._prepare, state, data)
    per_term = jax.ShapeDtypeStruct((self.num_meshes,), jnp.float32)
    jobs = {"prepare": (self._prepare, (state, data))}
    outputs = []
    for m, group in enumerate(groups):
      args = (state.params, group, per_term if self.sequential and m > 0 else None)
      jobs[f"mesh {m}"] = (self._mesh_pass, args)
      outputs.append(jax.eval_shape(self._mesh_pass, *args))
    jobs["update"] = (self._update, (state, outputs))
    options = f"\ncompiler_options={sorted(compiler_options.items())}" if compiler_options else ""
    cache_keys = {name: f"{key}\nsplit step: {name}{options}" for name in jobs}
    seconds = dict.fromkeys(jobs, 0.0)

    def timed(name, fn):
      t0 = time.perf_counter()
      out = fn()
      seconds[name] += time.perf_counter() - t0
      return out

    with concurrent.futures.ThreadPoolExecutor(workers, "mgtrain-split-step") as pool:
      t0 = time.perf_counter()
      compiled = dict.fromkeys(jobs)
      if step_cache is not None:
        compiled = dict(zip(jobs, pool.map(
            lambda n: timed(n, lambda: step_cache.load(cache_keys[n], *jobs[n][1])), jobs)))
      hits = {name: c is not None for name, c in compiled.items()}
      t1 = time.perf_counter()
      missing = [name for name in jobs if compiled[name] is None]
      lowered = {n: timed(n, lambda n=n: jobs[n][0].lower(*jobs[n][1])) for n in missing}
      t2 = time.perf_counter()

      def build(name):
        out = lowered[name].compile(compiler_options=compiler_options or None)
        if step_cache is not None:
          step_cache.store(out, cache_keys[name], *jobs[name][1])
        return out

      compiled.update(zip(missing, pool.map(lambda n: timed(n, lambda: build(n)), missing)))
      t3 = time.perf_counter()
    return CompiledSplitStep(
        compiled["prepare"], [compiled[f"mesh {m}"] for m in range(len(groups))],
        compiled["update"], self.sequential, hits=hits, seconds=seconds,
        lower_seconds=t2 - t1, compile_seconds=(t1 - t0) + (t3 - t2))


__all__ = ["SplitStep", "CompiledSplitStep"]
