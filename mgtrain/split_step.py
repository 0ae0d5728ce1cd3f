"""A stage's MGE train step as one XLA program per model pass.

:func:`mgtrain.full_multiscale.make_stage_step` jits a whole step (sampling,
every level's forward and backward passes, the optimizer) into one program.
One big program is slow to compile and, above all, slow to load: XLA's
compile and its executable loading grow faster than linearly with the
program's size. :class:`SplitStep` computes the *same* step as ``L + 2``
programs, run one after another on one device:

* ``prepare(state, data)``: the step's keys
  (:func:`mgtrain.full_multiscale.step_keys`), every level's batch and its
  views (:func:`mgtrain.mge.level_views`); with ``fuse_meshes`` regrouped by
  mesh (:func:`mgtrain.mge.mesh_groups`: batches
  ``N_0, N_1 + N_0, ..., N_{L-1} + N_{L-2}``); a chunked pass's inputs cut
  into chunks (below);
* ``pass k`` for each of the ``L`` terms (or meshes): the value and gradient
  of term ``k`` of Eq. 6 (:func:`mgtrain.mge.term_value_and_grad`: the same
  samples on meshes ``k`` and ``k+1``), or with ``fuse_meshes`` of mesh
  ``k``'s weighted batch (:func:`mgtrain.mge.mesh_value_and_grad`);
* ``update(state, outputs) -> (state, metrics)``: the per-level gradients
  stacked (or, by mesh, summed in the one-program step's order) and
  :func:`mgtrain.full_multiscale.apply_gradient`. It donates the state.

So ``tx`` is what :func:`mgtrain.full_multiscale.make_stage_step` takes with
the same ``fuse_meshes`` (a ``multiscale(..., level_terms=not fuse_meshes)``).
The step draws the same samples and computes the same sums, so its update
equals the one-program step's to float rounding (XLA fuses the programs
differently).

Why: the UNet's 4-level MGE step by mesh at 64^2 on the 2-core CPU
(2026-12-05, fresh processes, ``python -m experiments.first_step``, every
second before the first step counted): 74.1 s cold as one program, 71.1 s
split (compile 56.4 -> 49.8 s); from :class:`mgtrain.step_cache.StepCache`
10.4 / 10.9 s as one program (loading its executable: 8.3 / 8.9 s) and
3.7 / 3.9 s split (the programs loaded side by side: 1.6 s). Steps took
the same time (by mesh 1.90 against 1.87 s, 10 interleaved rounds of
``python -m experiments.levers``; by term, each alone, 2.08 against
2.03 s). Their
programs also compile side by side (:meth:`SplitStep.compile`,
``workers``), which pays on a machine with idle cores; on this 2-core CPU
one XLA compile already keeps 1.6 cores busy. Big passes are where it
loses: every program call allocates its working memory afresh, and on this
VM fresh memory faults slowly. The UNet's step by mesh at 128^2 cost 3.93
single-scale b16 steps split against 2.24 as one program, and 2.07 split
with glibc keeping freed memory (``experiments.denoise.resolve_split_step``
turns ``--split-step auto`` off there).

Chunked passes are one program called once per chunk. Where
``max_pixels_per_chunk`` splits a pass's batch into ``k`` chunks, the
one-program step runs them as a rolled loop when ``sequential``
(:func:`mgtrain.mge.sum_over_chunks`) and unrolls ``k`` copies of the model's
forward and backward pass otherwise. Here ``prepare`` cuts the
batch into its chunks and zeroes an accumulator, and the pass's *chunk
program* (one chunk's value and gradient, added to the accumulator, which it
donates) runs ``k`` times: one chunk's compile, whatever ``k``, so the
number of chunks is not capped (:data:`mgtrain.mge.MAX_CHUNKS`). The sums
run in the one-program step's order; a term's sum is divided by ``k`` in
``update``. A 2026-12-05 probe (``/tmp``; fwd+bwd of one single-scale
batch of 240, chunks of ``2**18`` pixels, passes one after another, huge
pages on as the CLIs set them, rounds interleaved): reference ResNet at
128^2 in 15 chunks compiled in 2.5 s against 19.7 s unrolled, 40.6 against
40.2 s per call; reference UNet at 64^2 in 4 chunks 14.2 against 35.5 s,
12.9 against 12.4 s per call; ResNet at 64^2 2.1 against 5.1 s, 10.0
against 10.1 s. Same values (largest difference 3e-8 in the loss, 0.0 in the
gradients). Without huge pages the calls were 22% slower at 64^2: each call
allocates its working memory afresh. (Those compiles compare with the
unrolled chunks the one-program step had then; its rolled loop now compiles
as fast: UNet 128^2 in 15 chunks, 16.6 s against 168.9 s unrolled.)

With ``sequential`` pass ``k+1``'s inputs depend on pass ``k``'s output
(:func:`mgtrain.mge.sequence_after`), so it starts only once pass ``k``'s
program has finished and one pass's activations are alive at a time, as in
the one-program step's ``sequential`` mode; chunks inside a pass
(``max_pixels_per_chunk``) follow the same flag. Each pass also returns a
float32 scalar made from its value, which the next pass waits on, and pass 0
waits on a zero: every pass has one signature, known before any is traced.

Warm starts trace nothing. :meth:`SplitStep.compile` traces the sampling
program only (to shape the passes' inputs), looks every program up in the
step cache, and takes the update's input shapes from the loaded (or, on a
miss, lowered) passes (``out_info``): no model pass is traced twice, and
none at all when the cache has them.

Passes shared between stages. A pass program depends only on the loss, the
chunking, ``sequential`` (and, by mesh, the number of terms) and the shapes
of its inputs, not on the stage. In a Full-Multiscale schedule by term,
stage ``s``'s terms after the first are stage ``s-1``'s terms: the same
levels, batch sizes and position in the sequence. :meth:`SplitStep.compile`
takes a ``shared`` table (one per training run, as
:func:`mgtrain.full_multiscale.train` keeps) and reuses any pass program an
earlier stage compiled, so each stage compiles one new pass: 4 pass
programs instead of 1 + 2 + 3 + 4 for four stages.

Example::

  step = SplitStep(stage, hierarchy, loss_fn, sample_fn, tx)
  compiled = step.compile(state, data)          # or call ``step`` directly
  state, metrics = compiled(state, data)
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mgtrain.full_multiscale import Stage, TrainState, apply_gradient, step_keys
from mgtrain.hierarchy import Hierarchy
from mgtrain.mge import add_mesh_pass, batch_and_pixels, chunk_size, level_views, mesh_groups, \
    mesh_value_and_grad, sequence_after, split_chunks, term_value_and_grad
from mgtrain.sampling import draw_levels


class CompiledSplitStep:
  """The compiled programs of a :class:`SplitStep`; ``(state, data) -> (state, metrics)``.

  Attributes:
    chunks: per pass, how many calls of its program a step makes (1 unless
      the pass is chunked; then its program is the chunk program).
    hits: per program (``prepare``, ``pass 0``, ..., ``update``), whether it
      came from the step cache (all False without one).
    reused: per program, whether it was an earlier stage's, from the
      ``shared`` table of :meth:`SplitStep.compile` (neither loaded nor
      compiled).
    seconds: per program, the seconds spent on it (load, or lowering and
      compile); the programs compile side by side, so these overlap.
    lower_seconds: wall seconds of tracing and lowering, including the
      sampling program's shape trace (all there is when every program hit).
    compile_seconds: wall seconds of the cache loads and XLA's compiles.
  """

  def __init__(self, prepare, passes, update, chunks: tuple, hits: dict, reused: dict,
               seconds: dict, lower_seconds: float, compile_seconds: float):
    self._prepare = prepare
    self.chunks = chunks
    self._passes = list(passes)
    self._update = update
    self.hits = hits
    self.reused = reused
    self.seconds = seconds
    self.lower_seconds = lower_seconds
    self.compile_seconds = compile_seconds

  @property
  def programs(self) -> dict:
    """The compiled programs (``jax.stages.Compiled``) by name."""
    return {"prepare": self._prepare,
            **{f"pass {k}": c for k, c in enumerate(self._passes)},
            "update": self._update}

  def __call__(self, state: TrainState, data):
    return _run(self._prepare, lambda k, acc: self._passes[k], lambda chunks: self._update,
                state, data)


def _run(prepare, pass_for, update_for, state, data):
  """One step: ``prepare``, every pass ``k`` through ``pass_for(k,
  accumulator)`` (a chunked pass: one call per chunk, adding into the
  accumulator that ``prepare`` zeroed), then ``update_for(chunks)``. The
  passes wait on each other's tokens when ``prepare`` hands out a first one
  (``sequential``)."""
  per_pass, accumulators, after = prepare(state, data)
  outputs = []
  for k, (chunks, acc) in enumerate(zip(per_pass, accumulators)):
    one_pass = pass_for(k, acc)
    for chunk in chunks:
      out = one_pass(state.params, chunk, after) if acc is None else \
          one_pass(state.params, chunk, acc, after)
      acc = out[:2] if acc is not None else None
      if after is not None:
        after = out[-1]   # the pass's token
    outputs.append(out)
  return update_for(tuple(len(chunks) for chunks in per_pass))(state, outputs)


# What a pass returns last and the next one waits on (``sequential``).
_TOKEN = jax.ShapeDtypeStruct((), jnp.float32)


def _abstract(tree):
  """Plain ``ShapeDtypeStruct``s (shape, dtype, weak type) of ``tree``'s
  leaves, without the shardings and layouts that ``out_info`` adds, so that a
  program's step-cache fingerprint does not depend on where its input shapes
  came from."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False)),
      tree)


def _identity(fn):
  """``fn`` itself where it can be a dict key, else its ``id`` (then the
  table that holds it must not outlive ``fn``: one table per run)."""
  try:
    hash(fn)
  except TypeError:
    return ("id", id(fn))
  return fn


def _signature(args) -> tuple:
  """What a compiled program's inputs must match: tree structure, shapes,
  dtypes and weak types of ``args`` (arrays or ``jax.ShapeDtypeStruct``s)."""
  leaves, tree = jax.tree.flatten(_abstract(args))
  return tree, tuple((leaf.shape, leaf.dtype, leaf.weak_type) for leaf in leaves)


class SplitStep:
  """One stage's train step as one program per model pass (see the module docstring).

  Calling it jits each program on first use (one after another); use
  :meth:`compile` to compile them ahead, side by side, or through a step
  cache.

  Args:
    stage, hierarchy, loss_fn, sample_fn, tx, max_pixels_per_chunk,
      fuse_meshes: as for :func:`mgtrain.full_multiscale.make_stage_step`
      (with ``fuse_meshes`` ``loss_fn`` must return a per-sample ``(B,)``
      loss).
    sequential: each pass (and each chunk inside one) waits for the
      previous, so one pass's activations are alive at a time.
  """

  def __init__(self, stage: Stage, hierarchy: Hierarchy, loss_fn: Callable,
               sample_fn: Callable, tx: optax.GradientTransformation,
               max_pixels_per_chunk: int | None = None, sequential: bool = False,
               fuse_meshes: bool = False):
    self.stage = stage
    self.sequential = sequential
    self.fuse_meshes = fuse_meshes
    num_terms = len(stage.levels)
    crops = hierarchy.subsample != "coarsen"

    def pass_chunks(inputs) -> int:
      """How many chunk calls pass ``inputs`` takes: every chunk holds at
      most ``max_pixels_per_chunk`` samples x pixels (uncapped in number,
      as one chunk program serves them all)."""
      n, pixels = batch_and_pixels((inputs[0],) if fuse_meshes else inputs)
      return n // chunk_size(n, pixels, max_pixels_per_chunk, max_chunks=None)

    def prepare(state: TrainState, data):
      """``(per_pass, accumulators, first_token)``: per pass the list of its
      chunks' inputs (one entry if unchunked), a zero ``(value, grad)``
      accumulator for each chunked pass (None otherwise), and what pass 0
      waits on (a zero token when sequential, else None)."""
      keys, k_crop = step_keys(state.rng, state.step, num_terms)
      batches, batch_levels = draw_levels(sample_fn, data, keys, stage.batch_sizes, hierarchy,
                                          stage.levels)
      views = level_views(batches, hierarchy, stage.levels, k_crop if crops else None,
                          batch_levels)
      per_pass, accumulators = [], []
      for inputs in (mesh_groups(views) if fuse_meshes else views):
        k = pass_chunks(inputs)
        per_pass.append(split_chunks(inputs, k) if k > 1 else [inputs])
        accumulators.append(None if k == 1 else (
            jnp.zeros((num_terms,) if fuse_meshes else (), jnp.float32),
            jax.tree.map(jnp.zeros_like, state.params)))
      first = jnp.zeros(_TOKEN.shape, _TOKEN.dtype) if sequential else None
      return per_pass, accumulators, first

    def value_and_grad(params, inputs):
      """One program call's batch, whole (``prepare`` did the chunking)."""
      if fuse_meshes:
        return mesh_value_and_grad(loss_fn, params, inputs, num_terms)
      return term_value_and_grad(loss_fn, params, inputs)

    def one_pass(params, inputs, after):
      """``(value, grad, token)``; the token is ``sum(value)`` in float32."""
      if after is not None:
        inputs = sequence_after(inputs, after)
      value, grad = value_and_grad(params, inputs)
      return value, grad, jnp.sum(value).astype(_TOKEN.dtype)

    def chunk_pass(params, chunk, acc, after):
      """One chunk of a chunked pass added to ``acc``: ``(value, grad,
      token)`` summed over the chunks so far (the one-program step's
      :func:`mgtrain.mge.sum_over_chunks`, in the same order)."""
      if after is not None:
        chunk = sequence_after(chunk, after)
      value, grad = value_and_grad(params, chunk)
      value = acc[0] + value.astype(jnp.float32)
      return value, jax.tree.map(jnp.add, acc[1], grad), jnp.sum(value).astype(_TOKEN.dtype)

    def update(state: TrainState, outputs, chunks: tuple):
      if not fuse_meshes:   # the multiscale transform stacks a list of level terms
        # A chunked term is the mean of its chunks' means (term_value_and_grad).
        means = [(value / k, jax.tree.map(lambda g, k=k: g / k, grad)) if k > 1 else
                 (value, grad) for (value, grad, _), k in zip(outputs, chunks)]
        terms = jnp.stack([value for value, _ in means])
        return apply_gradient(state, stage, tx, [g for _, g in means], terms)
      total = None
      for value, grad, _ in outputs:
        total = add_mesh_pass(total, (value, grad))
      terms, grad = total
      return apply_gradient(state, stage, tx, grad, terms)

    self._prepare = jax.jit(prepare)
    # One jit each; each pass's input shapes trace and compile their own program.
    self._pass = jax.jit(one_pass)
    self._chunk_pass = jax.jit(chunk_pass, donate_argnums=2)
    self._update_fn = update
    self._updates = {}
    # What, besides its input shapes, a pass program depends on (the key of
    # ``compile``'s shared table): the loss (by identity), the chunking,
    # ``sequential``, and by mesh the number of terms (the weights' length).
    self._pass_identity = (_identity(loss_fn), max_pixels_per_chunk, sequential, fuse_meshes,
                           num_terms if fuse_meshes else None)

  def _update_for(self, chunks: tuple):
    """The jitted update for passes of ``chunks`` chunk calls each (a term's
    sum over its chunks is divided by their number there)."""
    if chunks not in self._updates:
      self._updates[chunks] = jax.jit(functools.partial(self._update_fn, chunks=chunks),
                                      donate_argnums=0)
    return self._updates[chunks]

  def _pass_program(self, accumulator):
    """The jitted program of a pass: the chunk program if it is chunked."""
    return self._pass if accumulator is None else self._chunk_pass

  @property
  def num_passes(self) -> int:
    """``L``: one pass per term of Eq. 6, or per mesh with ``fuse_meshes``."""
    return len(self.stage.levels)

  def __call__(self, state: TrainState, data):
    return _run(self._prepare, lambda k, acc: self._pass_program(acc), self._update_for,
                state, data)

  def compile(self, state, data, *, step_cache=None, key: str | None = None,
              workers: int | None = None, compiler_options: dict | None = None,
              shared: dict | None = None) -> CompiledSplitStep:
    """Compiles the ``L + 2`` programs (a chunked pass's is its chunk
    program), ``workers`` at a time (threads).

    ``state`` and ``data`` are arrays or ``jax.ShapeDtypeStruct``s; the
    programs' other inputs are derived with ``jax.eval_shape``. With a
    :class:`mgtrain.step_cache.StepCache` each program is first looked up
    under ``key`` plus its name (``key`` must then describe the stage's
    step, as for :meth:`StepCache.compile`), and the ones it lacks are
    stored once compiled. In phases: the sampling program's shape trace,
    the cache loads of it and the passes (side by side), tracing and
    lowering the ones missing (one after another: tracing holds Python's
    lock), the same for the update (whose input shapes are the passes'
    outputs), then XLA's compiles (side by side: they release it).
    ``workers`` defaults to the number of programs, at most
    ``os.cpu_count()``; on the 2-core CPU, where one XLA compile already
    keeps 1.6 cores busy, side by side saves nothing, but costs nothing
    either. ``compiler_options`` are XLA options for every program.

    ``shared``: a dict that the calls for every stage of one run pass in
    (start it empty). A pass program found there (same loss, chunking,
    ``sequential``, compiler options and input shapes; see the module
    docstring) is reused as is; the ones compiled here are added to it.
    """
    if step_cache is not None and not key:
      raise ValueError("SplitStep.compile with a step_cache needs a key describing the step")
    if workers is None:
      workers = min(self.num_passes + 2, os.cpu_count() or 1)
    if workers < 1:
      raise ValueError(f"workers must be at least 1, got {workers}")
    options = f"\ncompiler_options={sorted(compiler_options.items())}" if compiler_options else ""
    lower_s = compile_s = 0.0

    # The passes' inputs: tracing the sampling program is all it takes (the
    # passes' own signatures need no tracing: see the module docstring).
    t0 = time.perf_counter()
    per_pass, accumulators, after = _abstract(jax.eval_shape(self._prepare, state, data))
    chunks = tuple(len(c) for c in per_pass)
    # A chunked pass's program is its chunk program (its inputs: chunk 0's).
    jobs = {"prepare": (self._prepare, (state, data)),
            **{f"pass {k}": (self._pass_program(acc),
                             (state.params, c[0], after) if acc is None else
                             (state.params, c[0], acc, after))
               for k, (c, acc) in enumerate(zip(per_pass, accumulators))}}
    cache_keys = {name: f"{key}\nsplit step: {name}{options}" for name in jobs}
    cache_keys["update"] = f"{key}\nsplit step: update chunks={chunks}{options}"
    seconds = dict.fromkeys(cache_keys, 0.0)

    def timed(name, fn):
      t0 = time.perf_counter()
      out = fn()
      seconds[name] += time.perf_counter() - t0
      return out

    shared_keys = {name: (self._pass_identity, options, _signature(args))
                   for name, (_, args) in jobs.items() if name.startswith("pass ")}
    reused = {name: shared is not None and shared_keys.get(name) in shared
              for name in cache_keys}
    lower_s += time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(workers, "mgtrain-split-step") as pool:

      def load(names):
        if step_cache is None:
          return {n: None for n in names}
        return dict(zip(names, pool.map(
            lambda n: timed(n, lambda: step_cache.load(cache_keys[n], *jobs[n][1])), names)))

      def lower(names):   # one after another: tracing holds Python's lock
        return {n: timed(n, lambda n=n: jobs[n][0].lower(*jobs[n][1])) for n in names}

      t0 = time.perf_counter()
      compiled = {name: shared[shared_keys[name]] for name in jobs if reused[name]}
      compiled.update(load([name for name in jobs if not reused[name]]))
      t1 = time.perf_counter()
      lowered = lower([name for name in jobs if compiled[name] is None])
      t2 = time.perf_counter()
      # The update's inputs are the passes' outputs, as their programs say.
      outputs = [_abstract(lowered[name].out_info if name in lowered else
                           compiled[name].out_info)
                 for name in (f"pass {k}" for k in range(self.num_passes))]
      jobs["update"] = (self._update_for(chunks), (state, outputs))
      compiled.update(load(["update"]))
      t3 = time.perf_counter()
      if compiled["update"] is None:
        lowered.update(lower(["update"]))
      t4 = time.perf_counter()
      hits = {name: compiled[name] is not None and not reused[name] for name in cache_keys}

      def build(name):
        if step_cache is None:
          return lowered[name].compile(compiler_options=compiler_options or None)
        return step_cache.compile_and_store(lowered[name], cache_keys[name], *jobs[name][1],
                                            compiler_options=compiler_options)

      compiled.update(zip(lowered, pool.map(lambda n: timed(n, lambda: build(n)), lowered)))
      t5 = time.perf_counter()
    lower_s += (t2 - t1) + (t4 - t3)
    compile_s += (t1 - t0) + (t3 - t2) + (t5 - t4)
    if shared is not None:
      for name, shared_key in shared_keys.items():
        shared.setdefault(shared_key, compiled[name])
    return CompiledSplitStep(
        compiled["prepare"], [compiled[f"pass {k}"] for k in range(self.num_passes)],
        compiled["update"], chunks, hits=hits, reused=reused, seconds=seconds,
        lower_seconds=lower_s, compile_seconds=compile_s)


__all__ = ["SplitStep", "CompiledSplitStep"]
