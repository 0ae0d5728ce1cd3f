"""Full-Multiscale training (Algorithm 2 of the MGE paper) and its special cases.

Algorithm 2::

  Randomly initialize theta_*^H
  for j = 1..L:
    set the mesh to h_j = 2^(L-j) h and theta_0^{h_j} = theta_*^H
    solve the optimization problem on mesh h_j for theta_*^{h_j}
    theta_*^H <- theta_*^{h_j}

A run is a list of :class:`Stage` s. Stage ``s`` (0 = coarsest) trains on
mesh ``h 2^(L-1-s)`` with an ``(s+1)``-level MGE estimate (Algorithm 1) over
levels ``L-1-s .. L-1`` and batches ``N_k = 2^k N_0``, for ``I_s``
iterations. Multiscale (MGE every step on the finest mesh) and single-scale
(one level, batch ``sum_k N_k``: the same samples as one MGE step) are the
same machinery with one stage.

Shapes differ per stage, so the run is a fold over stages (a Python loop over
the static stage list) whose carry is a :class:`TrainState`; each stage's
step is compiled once (``jax.jit`` with the state donated) and reused for
all its iterations. Every step adds its #WU (:mod:`mgtrain.workunits`) to
``TrainState.work_units``, so the live total equals the closed form of the
schedule.

Example:
  >>> from mgtrain.hierarchy import Hierarchy
  >>> h = Hierarchy(levels=4, size=64, base_batch=16)
  >>> [s.levels for s in full_multiscale_schedule(h, (2000, 1000, 500, 250))]
  [(3,), (2, 3), (1, 2, 3), (0, 1, 2, 3)]
  >>> float(schedule_work_units(full_multiscale_schedule(h, (2000, 1000, 500, 250))))
  28750.0
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from fractions import Fraction
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from mgtrain import workunits
from mgtrain import parallel
from mgtrain.hierarchy import Hierarchy, HierarchyError, levels_for_stage
from mgtrain.mge import mge_value_and_grad, mge_value_and_grad_by_mesh
from mgtrain.sampling import draw_levels
from mgtrain.step_cache import cached_call
from mgtrain.transform import multiscale, same_shapes

STRATEGIES = ("single", "multiscale", "full-multiscale")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a run: consecutive levels (finest first), their batches, iterations."""

  levels: tuple[int, ...]
  batch_sizes: tuple[int, ...]
  iterations: int

  def __post_init__(self):
    if len(self.levels) != len(self.batch_sizes):
      raise HierarchyError(
          f"stage has {len(self.levels)} levels but {len(self.batch_sizes)} batch sizes")
    if self.iterations < 1:
      raise HierarchyError(f"a stage needs >= 1 iteration, got {self.iterations}")

  @property
  def mesh_level(self) -> int:
    """The finest level of the stage: the mesh it 'trains on'."""
    return self.levels[0]

  @property
  def work_units_per_step(self) -> Fraction:
    return workunits.step_work_units(self.levels, self.batch_sizes)


def single_scale_schedule(hierarchy: Hierarchy, iterations: int,
                          batch_size: int | None = None) -> list[Stage]:
  """Plain SGD on the finest mesh; default batch = the same samples as one MGE step."""
  batch = hierarchy.total_batch if batch_size is None else batch_size
  return [Stage((0,), (batch,), iterations)]


def multiscale_schedule(hierarchy: Hierarchy, iterations: int) -> list[Stage]:
  """MGE with all ``L`` levels at every step (the paper's 'Multiscale')."""
  return [Stage(tuple(range(hierarchy.levels)), hierarchy.batch_sizes, iterations)]


def full_multiscale_schedule(hierarchy: Hierarchy,
                             stage_iterations: Sequence[int]) -> list[Stage]:
  """Algorithm 2: stage ``s`` uses levels ``L-1-s .. L-1``; iterations coarsest first."""
  its = hierarchy.check_schedule(stage_iterations, "stage_iterations")
  stages = []
  for s, it in enumerate(its):
    lv = levels_for_stage(hierarchy.levels, s)
    stages.append(Stage(lv, tuple(hierarchy.batch_sizes[k] for k in lv), it))
  return stages


def make_schedule(strategy: str, hierarchy: Hierarchy, iterations: int,
                  stage_iterations: Sequence[int] | None = None) -> list[Stage]:
  """The stages of ``strategy`` (one of :data:`STRATEGIES`)."""
  if strategy == "single":
    return single_scale_schedule(hierarchy, iterations)
  if strategy == "multiscale":
    return multiscale_schedule(hierarchy, iterations)
  if strategy == "full-multiscale":
    if stage_iterations is None:
      raise HierarchyError("full-multiscale needs stage_iterations")
    return full_multiscale_schedule(hierarchy, stage_iterations)
  raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def schedule_work_units(stages: Sequence[Stage]) -> Fraction:
  """Exact #WU of a whole schedule (closed form of Appendix B)."""
  return workunits.schedule_work_units(
      [(s.levels, s.batch_sizes, s.iterations) for s in stages])


def schedule_record(stages: Sequence[Stage], hierarchy: Hierarchy) -> dict:
  """A JSON-able record of a run's schedule: what a checkpoint must match to
  be resumed by :func:`train`.

  >>> h = Hierarchy(levels=2, size=16, base_batch=1)
  >>> schedule_record(full_multiscale_schedule(h, (4, 2)), h)["stages"]
  [{'levels': [1], 'batch_sizes': [2], 'iterations': 4}, {'levels': [0, 1], 'batch_sizes': [1, 2], 'iterations': 2}]
  """
  return {"stages": [{"levels": list(st.levels), "batch_sizes": list(st.batch_sizes),
                      "iterations": st.iterations} for st in stages],
          "hierarchy": repr(hierarchy)}


def stage_boundaries(stages: Sequence[Stage]) -> np.ndarray:
  """Global step at which each stage starts, plus the total: ``(S + 1,)``."""
  return np.concatenate([[0], np.cumsum([s.iterations for s in stages])]).astype(int)


def locate(stages: Sequence[Stage], step: int) -> tuple[int, int]:
  """``(stage index, step within stage)`` of global ``step`` (total -> past the end)."""
  bounds = stage_boundaries(stages)
  if step >= bounds[-1]:
    return len(stages), 0
  s = int(np.searchsorted(bounds, step, side="right") - 1)
  return s, int(step - bounds[s])


class TrainState(flax.struct.PyTreeNode):
  """The carry of the Full-Multiscale fold.

  Attributes:
    step: global optimizer step (int32).
    level: finest level of the current stage (int32; 0 = finest mesh).
    params: model parameters.
    opt_state: optimizer state of the current stage.
    rng: raw uint32 PRNG key; step ``k`` uses ``fold_in(rng, k)``, so nothing
      random is stored and a resumed run draws what an uninterrupted one would.
    work_units: #WU spent so far (float32; exact for dyadic per-step costs).
  """

  step: jax.Array
  level: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  work_units: jax.Array


def init_state(params, seed: int, opt_state=None, level: int = 0) -> TrainState:
  return TrainState(
      step=jnp.zeros([], jnp.int32), level=jnp.asarray(level, jnp.int32),
      params=params, opt_state=opt_state, rng=jax.random.PRNGKey(seed),
      work_units=jnp.zeros([], jnp.float32))


def fresh_state(params, seed: int, tx: optax.GradientTransformation,
                level: int = 0, step_cache=None, cache_key: str | None = None) -> TrainState:
  """``init_state(copy of params, seed, tx.init(params), level)`` as one jitted program.

  The parameters are copied, so a step that donates its state leaves the
  caller's arrays alive. Run eagerly, the copies and the optimizer's
  ``zeros_like`` are one small compilation per leaf: 2.0 s for the
  reference UNet on a 2-core CPU, 0.6 s as one program.

  With a :class:`mgtrain.step_cache.StepCache`, ``cache_key`` must
  describe ``tx`` (the program depends on it beyond its arguments).
  """
  build = jax.jit(lambda p: init_state(jax.tree.map(jnp.copy, p), seed, tx.init(p), level))
  if step_cache is not None and not cache_key:
    raise ValueError("fresh_state with a step_cache needs a cache_key describing tx")
  return cached_call(step_cache, build, params,
                     key=f"mgtrain.fresh_state seed={seed} level={level} {cache_key}")


_INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
_SCHEDULE_STATES = (optax.ScaleByScheduleState, *_INJECT_STATES)


def carry_inner_state(previous, fresh):
  """The inner optimizer state a new Full-Multiscale stage starts from.

  ``previous`` (the last stage's) is kept when its structure matches the new
  stage's optimizer, so moment estimates survive the hot start, but every
  learning-rate schedule in it restarts: each stage runs its own schedule
  over its own iterations. A schedule's state is taken from ``fresh``
  wherever it sits in the tree: an ``optax.inject_hyperparams`` state (its
  count and hyperparameters; the wrapped optimizer's state is carried) and
  the ``ScaleByScheduleState`` of a schedule passed straight to an optimizer
  (``optax.adam(optax.cosine_decay_schedule(lr, n))``), whose count would
  otherwise continue past the new schedule's end, where a decaying rate is 0.
  Adam's own step count and bias correction continue. If the structures
  differ, ``fresh`` is returned.

  >>> import jax.numpy as jnp
  >>> make = lambda n: optax.adam(optax.cosine_decay_schedule(1e-2, n))
  >>> params = {"w": jnp.ones(2)}
  >>> old = make(4).init(params)
  >>> for _ in range(4):
  ...   _, old = make(4).update({"w": jnp.ones(2)}, old, params)
  >>> new = carry_inner_state(old, make(2).init(params))
  >>> int(new[0].count), int(new[1].count)   # Adam's count goes on, the schedule's restarts
  (4, 0)
  """
  if not same_shapes(previous, fresh):
    return fresh
  return _restart_schedules(previous, fresh)


def _restart_schedules(previous, fresh):
  """``previous`` with each schedule state (:data:`_SCHEDULE_STATES`) taken
  from ``fresh``; the two trees have the same structure."""

  def restart(p, f):
    if isinstance(p, optax.ScaleByScheduleState):
      return f
    if isinstance(p, _INJECT_STATES):
      return f._replace(inner_state=_restart_schedules(p.inner_state, f.inner_state))
    return p

  return jax.tree.map(restart, previous, fresh,
                      is_leaf=lambda x: isinstance(x, _SCHEDULE_STATES))


def make_stage_step(stage: Stage, hierarchy: Hierarchy, loss_fn: Callable,
                    sample_fn: Callable, tx: optax.GradientTransformation,
                    max_pixels_per_chunk: int | None = None, fuse_meshes: bool = False,
                    sequential: bool = False):
  """The pure train step of one stage: ``step(state, data) -> (state, metrics)``.

  Each level draws its own fresh batch with ``sample_fn(data, key, n)``
  (returning a batch on the finest mesh; a
  :func:`mgtrain.sampling.coarse_sampler` draws it on the term's finest mesh
  instead, see :func:`mgtrain.sampling.draw`), MGE computes the per-level
  gradient terms, ``tx`` (a :func:`mgtrain.transform.multiscale`) combines and
  applies them, and the step's #WU is added to the counter. ``metrics`` holds
  the scalar ``loss``, the per-level ``terms`` and the updated ``work_units``
  (a copy outside the state, so it can be read after the state is donated).
  ``max_pixels_per_chunk`` is passed to :func:`mgtrain.mge.mge_value_and_grad`.
  With ``fuse_meshes`` the gradient comes from
  :func:`mgtrain.mge.mge_value_and_grad_by_mesh` (one pass per mesh, already
  summed), so ``tx`` must be a ``multiscale(..., level_terms=False)``.
  ``sequential`` runs the model passes one after another, so the step plans
  the largest pass's memory rather than the sum (see
  :func:`mgtrain.mge.mge_value_and_grad_by_mesh`).
  """
  value_and_grad = mge_value_and_grad_by_mesh if fuse_meshes else mge_value_and_grad
  crops = hierarchy.subsample != "coarsen"

  def step(state: TrainState, data):
    keys, k_crop = step_keys(state.rng, state.step, len(stage.levels))
    batches, batch_levels = draw_levels(sample_fn, data, keys, stage.batch_sizes, hierarchy,
                                        stage.levels)
    loss, level_grads, terms = value_and_grad(
        loss_fn, state.params, batches, hierarchy, stage.levels,
        key=k_crop if crops else None, input_level=batch_levels,
        max_pixels_per_chunk=max_pixels_per_chunk, sequential=sequential)
    return apply_gradient(state, stage, tx, level_grads, terms)

  return step


def step_keys(rng: jax.Array, step, levels: int) -> tuple[jax.Array, jax.Array]:
  """``(per-level sampling keys (levels,), crop key)`` of train step ``step``.

  Every form of a stage's step (one program, one program per model pass,
  levels on device groups) derives its randomness here, so they draw the
  same samples.
  """
  k_data, k_crop = jax.random.split(jax.random.fold_in(rng, step))
  return jax.random.split(k_data, levels), k_crop


def apply_gradient(state: TrainState, stage: Stage, tx: optax.GradientTransformation,
                   level_grads, terms: jax.Array):
  """The end of a train step: ``tx``'s update, the step and #WU counters.

  ``level_grads`` is what ``tx`` expects (stacked per level or a list of
  per-level terms, which :func:`mgtrain.transform.multiscale` stacks, or
  already summed for ``level_terms=False``); ``terms`` the ``(L,)`` loss terms,
  whose sum is the step's ``loss``. Returns ``(state, metrics)`` as
  :func:`make_stage_step`'s step does.
  """
  updates, opt_state = tx.update(level_grads, state.opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1, level=jnp.asarray(stage.mesh_level, jnp.int32),
      params=optax.apply_updates(state.params, updates), opt_state=opt_state,
      work_units=state.work_units + float(stage.work_units_per_step))
  return new_state, {"loss": jnp.sum(terms), "terms": terms,
                     "work_units": new_state.work_units}


def train(*, params, stages: Sequence[Stage], hierarchy: Hierarchy, loss_fn: Callable,
          sample_fn: Callable, data, make_optimizer: Callable[[int], optax.GradientTransformation],
          seed: int = 0, eval_fn: Callable | None = None, eval_every: int = 0,
          checkpointer=None, progress: bool = True, description: str = "train",
          stop_after: int | None = None, max_pixels_per_chunk: int | None = None,
          carry_optimizer: bool = True, mesh=None, fuse_meshes: bool = False,
          level_parallel=None, step_cache=None, step_cache_key: str | None = None,
          sequential: bool = False, compile_ahead: bool = False, split_step: bool = False,
          stop_requested=None):
  """Runs ``stages`` in order (the Full-Multiscale fold) and returns ``(state, history)``.

  Args:
    params: initial parameters (ignored when a checkpoint is restored).
    stages: the schedule, e.g. from :func:`make_schedule`.
    hierarchy: the resolution hierarchy.
    loss_fn: per-sample loss ``loss_fn(params, batch) -> (B,)``.
    sample_fn: ``sample_fn(data, key, n)`` -> a batch of ``n`` fresh samples
      on the finest mesh (pure, jittable).
    data: pytree of arrays passed to every step (e.g. a patch pool). Host
      (numpy) arrays are put on the device once, before the first step.
    make_optimizer: ``make_optimizer(iterations) -> optax transform``; each
      stage gets a fresh one (e.g. Adam with a cosine schedule over the
      stage), wrapped in :func:`mgtrain.transform.multiscale`.
    seed: PRNG seed of the run.
    eval_fn: optional ``eval_fn(params) -> dict`` of float metrics, run every
      ``eval_every`` steps and at the end of every stage.
    checkpointer: optional :class:`mgtrain.checkpoint.Checkpointer`; the run
      resumes from its latest checkpoint when there is one.
    progress: show a tqdm bar with loss, level and #WU.
    stop_after: stop (after checkpointing) once the global step reaches this
      value; used to test resumption.
    stop_requested: optional ``threading.Event`` (anything with
      ``is_set()``): once set, the run stops after the step in flight, as
      with ``stop_after``: the history records it and the checkpointer saves
      it, so rerunning resumes there. The experiment CLIs set it on the
      first Ctrl-C or SIGTERM (``experiments.runtime.stop_on_signal``).
    max_pixels_per_chunk: evaluate each level's batch in sub-batches of at
      most this many samples x pixels (same gradient; faster on CPU).
    carry_optimizer: at a stage boundary keep the inner optimizer's state
      (e.g. Adam's moments) instead of starting afresh; see
      :func:`carry_inner_state`. In the cpu denoising runs carrying alone
      did not help (MSE 0.0690 vs 0.0682 fresh); carrying together with a
      smaller peak rate for finer stages did (0.0612).
    mesh: optional device mesh with a ``'data'`` axis (see
      :func:`mgtrain.parallel.data_mesh`): every level's batch is split over
      it and the state and ``data`` are replicated, one jitted step per stage.
      Every batch size must be divisible by the axis size.
    fuse_meshes: evaluate MGE with one model pass per mesh
      (:func:`mgtrain.mge.mge_value_and_grad_by_mesh`): the same estimate, faster
      on a GPU, but without the transform's per-level statistics.
    level_parallel: ``None`` (off), ``True`` (all devices) or a list of
      devices: every stage runs its MGE terms on separate device groups,
      concurrently (:mod:`mgtrain.level_parallel`; groups sized by the terms'
      #WU, so a stage needs at least one device per level). Not combinable
      with ``mesh`` or ``fuse_meshes``. Its programs compile on the first
      step, so a stage's ``compile_seconds`` is that first step's wall time.
    step_cache: optional :class:`mgtrain.step_cache.StepCache`: each stage's
      compiled step is loaded from it when a previous run stored one, which
      skips tracing and compiling (a stage's ``compile_seconds`` is then the
      load time). Not combinable with ``level_parallel``.
    step_cache_key: required with ``step_cache``: a description of
      ``loss_fn``, ``sample_fn`` and ``make_optimizer`` (e.g. the experiment's
      config repr), which mgtrain cannot see inside. The stage, hierarchy and
      the other arguments of this call are added to it here.
    sequential: run each step's model passes (meshes, terms, chunks) one
      after another, so a step plans the memory of its largest pass instead
      of the sum (same values; :func:`mgtrain.mge.sequence_after`). Halves
      the 4-level MGE step's memory on CPU at no cost in time there. Ignored
      with ``level_parallel``, whose terms run on separate devices.
    compile_ahead: once the first stage's step is compiled, trace and
      compile every later stage's step in a background thread, one after
      another, while the stages train (from the abstract states the stage
      boundaries will produce), so that a stage starts without waiting for
      XLA once the time trained so far covers the compiles. A stage's
      ``compile_seconds`` is then the time the loop waited for its step, and
      ``history["background_compile_seconds"]`` the time each background
      compile took. XLA compiles with the GIL released; tracing holds it.
      Does nothing with ``mesh`` or ``level_parallel``.
    split_step: each stage's step is one program per model pass (per term,
      or per mesh with ``fuse_meshes``) plus a sampling and an update
      program (:class:`mgtrain.split_step.SplitStep`): the same update to
      float rounding, compiled in less time (side by side where cores are
      idle) and loaded from ``step_cache`` several times faster than one
      program; the price is a few program launches per step. By term, a
      stage reuses the pass programs of the stage before (its coarser
      terms), so each stage compiles one new pass. Not combinable with
      ``mesh`` or ``level_parallel``.

  Returns:
    ``(state, history)``; ``history`` holds per-step ``loss``,
    ``work_units`` and ``level``, the evaluations (each with its step, #WU,
    level and the train and compile seconds spent so far), and per-stage
    compile and train seconds. A stage's compile seconds include setting up
    its start state (the hot start's fresh optimizer state, 0.1-0.2 s for
    the 4-level ResNet on the 2-core CPU).
  """
  stages = list(stages)
  if level_parallel is not None and level_parallel is not False:
    if mesh is not None or fuse_meshes:
      raise ValueError("level_parallel cannot be combined with mesh or fuse_meshes")
    from mgtrain import level_parallel as lp_lib  # pylint: disable=g-import-not-at-top
    lp_devices = jax.devices() if level_parallel is True else list(level_parallel)
    for st in stages:
      lp_lib.group_sizes(st, len(lp_devices))   # fails early: too few devices
  else:
    lp_devices = None
  if split_step and (mesh is not None or lp_devices is not None):
    raise ValueError("split_step runs on one device: it cannot be combined with mesh or "
                     "level_parallel")
  if step_cache is not None:
    if lp_devices is not None:
      raise ValueError("step_cache does not cover level_parallel programs")
    if not step_cache_key:
      raise ValueError("step_cache needs step_cache_key: a description of loss_fn, "
                       "sample_fn and make_optimizer (e.g. repr of the config)")
  if mesh is not None:
    for st in stages:
      parallel.check_batches(st.batch_sizes, mesh)
    sample_fn = parallel.shard_batches(sample_fn, mesh)
    data = parallel.replicate(data, mesh)
  elif lp_devices is None:
    # Once, explicitly: host (numpy) arrays passed as they are would be
    # copied to the device again at every step.
    data = jax.device_put(data)
  bounds = stage_boundaries(stages)
  total = int(bounds[-1])
  optimizers = [multiscale(make_optimizer(s.iterations), len(s.levels),
                           level_terms=not fuse_meshes) for s in stages]

  history = {"step": [], "loss": [], "work_units": [], "level": [], "evals": [],
             "compile_seconds": [0.0] * len(stages),
             "train_seconds": [0.0] * len(stages),
             "schedule": schedule_record(stages, hierarchy)}
  ahead = compile_ahead and mesh is None and lp_devices is None
  state = fresh_state(params, seed, optimizers[0], stages[0].mesh_level, step_cache,
                      None if step_cache is None else
                      f"fm.train {step_cache_key} stage 0 {stages[0]!r} fuse={fuse_meshes}")

  if checkpointer is not None and checkpointer.latest_step() is not None:
    step = checkpointer.latest_step()
    saved_history = checkpointer.restore_history(step)
    saved = saved_history.get("schedule")
    # Checkpoints from before the schedule was recorded cannot be checked.
    if saved is not None and saved != history["schedule"]:
      raise ValueError(
          f"the checkpoint at step {step} in {checkpointer.directory} was written by a run "
          f"with another schedule ({saved}); this run's is {history['schedule']}. Resume "
          "with the same stages and hierarchy, or use a fresh checkpoint directory")
    # The checkpoint after step k holds the optimizer of the stage that ran step k.
    s, _ = locate(stages, max(step - 1, 0))
    if s >= len(stages):
      raise ValueError(
          f"checkpoint at step {step} is past this schedule's {total} steps; "
          "use a fresh workdir for a different schedule")
    abstract = jax.eval_shape(
        lambda p: init_state(p, seed, optimizers[s].init(p), stages[s].mesh_level), params)
    state, history = checkpointer.restore_state(step, abstract), saved_history

  start = int(state.step)

  def stage_start_state(state, s):
    """The state stage ``s`` starts from (hot start, Algorithm 2): the same
    parameters, the optimizer state carried over or started afresh (see
    ``carry_optimizer``)."""
    fresh = optimizers[s].init(state.params)
    if carry_optimizer:
      fresh = fresh._replace(
          inner_state=carry_inner_state(state.opt_state.inner_state, fresh.inner_state))
    return state.replace(opt_state=fresh, level=jnp.asarray(stages[s].mesh_level, jnp.int32))

  # Pass programs that later stages reuse (SplitStep: by term, each stage's
  # terms after its first are the previous stage's).
  shared_passes = {}

  def compile_stage(s, state_like):
    """Stage ``s``'s compiled step for states like ``state_like`` (arrays or
    ``jax.ShapeDtypeStruct``s)."""
    key = None if step_cache is None else (
        f"fm.train {step_cache_key}\nstage {s} {stages[s]!r}\n{hierarchy!r}\n"
        f"chunk={max_pixels_per_chunk} fuse={fuse_meshes} seq={sequential} seed={seed} "
        f"mesh={None if mesh is None else dict(mesh.shape)}")
    if split_step:
      from mgtrain.split_step import SplitStep  # pylint: disable=g-import-not-at-top
      return SplitStep(stages[s], hierarchy, loss_fn, sample_fn, optimizers[s],
                       max_pixels_per_chunk, sequential, fuse_meshes).compile(
                           state_like, data, step_cache=step_cache, key=key,
                           shared=shared_passes)
    step_fn = jax.jit(make_stage_step(stages[s], hierarchy, loss_fn, sample_fn, optimizers[s],
                                      max_pixels_per_chunk, fuse_meshes, sequential),
                      donate_argnums=0)
    if step_cache is None:
      return step_fn.lower(state_like, data).compile()
    compiled, _ = step_cache.compile(step_fn, state_like, data, key=key)
    return compiled

  def compile_in_background(s, state_like):
    t0 = time.perf_counter()
    compiled = compile_stage(s, state_like)
    return compiled, time.perf_counter() - t0

  if ahead:
    # A resumed run keeps the figures of the stages it already ran.
    history.setdefault("background_compile_seconds", [0.0] * len(stages))
  pool = concurrent.futures.ThreadPoolExecutor(1, "mgtrain-compile-ahead") if ahead else None
  ahead_steps = {}   # stage -> future of its step, compiling in the background
  bar = tqdm(total=total, initial=start, desc=description, disable=not progress,
             dynamic_ncols=True)
  last_eval = None
  try:
    for s, stage in enumerate(stages):
      if start >= bounds[s + 1]:
        continue
      step_in_stage = max(start - int(bounds[s]), 0)
      t0 = time.perf_counter()
      if step_in_stage == 0 and s > 0:
        state = jax.jit(functools.partial(stage_start_state, s=s))(state)
      if mesh is not None:
        state = parallel.replicate(state, mesh)
      stage_data = data
      if lp_devices is not None:
        compiled = lp_lib.make_level_parallel_step(
            stage, hierarchy, loss_fn, sample_fn, optimizers[s],
            lp_lib.device_groups(stage, lp_devices), max_pixels_per_chunk)
        state, stage_data = compiled.place(state, data)
      elif s in ahead_steps:
        compiled, background = ahead_steps.pop(s).result()
        history["background_compile_seconds"][s] += background
      else:
        compiled = compile_stage(s, state)
      history["compile_seconds"][s] += time.perf_counter() - t0
      if ahead and not ahead_steps and s + 1 < len(stages):
        # Once this call's first step is compiled, queue every later stage's,
        # one after another, from the abstract states of the stage
        # boundaries: their shapes do not depend on the values training
        # produces.
        like = state
        for later in range(s + 1, len(stages)):
          like = jax.eval_shape(functools.partial(stage_start_state, s=later), like)
          ahead_steps[later] = pool.submit(compile_in_background, later, like)

      t_stage = time.perf_counter()
      # Step k's metrics are read after step k+1 is queued, so the device
      # never idles while the host waits for a float.
      pending = None     # (step, metrics) of a step not yet recorded

      def record(entry, level=stage.mesh_level):
        k_, metrics_ = entry
        loss = float(metrics_["loss"])
        wu = float(metrics_["work_units"])
        history["step"].append(k_ + 1)
        history["loss"].append(loss)
        history["work_units"].append(wu)
        history["level"].append(level)
        bar.set_postfix(loss=f"{loss:.4f}", level=level, wu=f"{wu:,.0f}", refresh=False)
        bar.update(1)
        return wu

      first = int(bounds[s]) + step_in_stage
      for k in range(first, int(bounds[s + 1])):
        state, metrics = compiled(state, stage_data)
        if lp_devices is not None and k == first:
          # The level-parallel programs compiled during this first step.
          jax.block_until_ready(metrics)
          history["compile_seconds"][s] += time.perf_counter() - t_stage
          t_stage = time.perf_counter()
        if pending is not None:
          record(pending)
        pending = (k, metrics)
        done_stage = k + 1 == bounds[s + 1]
        evaluate = eval_fn is not None and ((eval_every and (k + 1) % eval_every == 0)
                                            or done_stage)
        stop = ((stop_after is not None and k + 1 >= stop_after)
                or (stop_requested is not None and stop_requested.is_set()))
        save = checkpointer is not None and (checkpointer.should_save(k + 1) or done_stage
                                             or stop)
        if not (evaluate or save or stop or done_stage):
          continue
        wu = record(pending)
        pending = None
        if evaluate:
          history["train_seconds"][s] += time.perf_counter() - t_stage
          last_eval = {k_: float(v) for k_, v in eval_fn(state.params).items()}
          history["evals"].append({"step": k + 1, "work_units": wu,
                                   "level": stage.mesh_level,
                                   "train_seconds": float(sum(history["train_seconds"])),
                                   "compile_seconds": float(sum(history["compile_seconds"])),
                                   **last_eval})
          t_stage = time.perf_counter()
        if save:
          history["train_seconds"][s] += time.perf_counter() - t_stage
          checkpointer.save(k + 1, state, history, force=True)
          t_stage = time.perf_counter()
        if stop:
          return state, history
      # The stage's last step was recorded above (done_stage), so its time
      # up to here includes the device finishing it.
      history["train_seconds"][s] += time.perf_counter() - t_stage
  finally:
    bar.close()
    if pool is not None:
      # A run stopped early (stop_after, an error) does not wait for a
      # compile it will not use.
      pool.shutdown(wait=False, cancel_futures=True)
  return state, history


__all__ = [
    "Stage", "TrainState", "STRATEGIES", "single_scale_schedule", "multiscale_schedule",
    "full_multiscale_schedule", "make_schedule", "schedule_work_units", "train",
    "make_stage_step", "step_keys", "apply_gradient", "schedule_record", "stage_boundaries",
    "locate",
    "init_state", "carry_inner_state",
]
