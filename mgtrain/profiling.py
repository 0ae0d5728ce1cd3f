"""Per-operation time of a compiled XLA program, from a ``jax.profiler`` trace.

``jax.profiler.trace`` records one event per executed HLO operation (a thunk
on CPU, a kernel on GPU) on the thread or stream that ran it. This module
runs a compiled program under the profiler, keeps the events that belong to
its HLO instructions, and folds them into one row per instruction:

  seconds per call = (sum of the instruction's event durations) / calls

with the instruction's opcode and result shape read from the optimised HLO
text (``compiled.as_text()``), and the lanes (thread or stream names) it ran
on. Rows for concurrent operations may overlap in time, so their sum can
exceed the wall time per call; :attr:`ProgramProfile.busy_seconds` is the
sum and :attr:`ProgramProfile.wall_seconds` the wall clock of the traced
calls. On CPU, multi-threaded ``dot`` and ``convolution`` thunks run
asynchronously: their events cover only the launch, and their kernels' time
shows up as :attr:`ProgramProfile.uncovered_seconds`, the wall time in which
no instruction event was open.

Why per-instruction rows, and lanes: on the CPU backend an FFT thunk that
runs on one of XLA's Eigen pool workers (``tf_XLAEigen...``), which is where
the rest of a step runs after any multi-threaded dot or convolution, hands
DUCC that same pool, blocks its own worker and so runs with one worker fewer
(serially on two cores). The lanes column is where that shows.

Example:
  >>> import jax, jax.numpy as jnp
  >>> f = jax.jit(lambda x: jnp.fft.irfft2(jnp.fft.rfft2(x) * 2.0, s=x.shape[-2:]))
  >>> x = jnp.ones((4, 32, 32))
  >>> prof = profile(f.lower(x).compile(), x, calls=2)
  >>> sorted({op.opcode for op in prof.ops})
  ['fft', 'fusion(kLoop)']
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax

# "%name = f32[16,128]{1,0} opcode(...)" or "ROOT %name = (f32[], ...) tuple(...)".
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\(.*?\)|[\w\[\],{}:\s]*?)\s+"
    r"(?P<opcode>[\w\-]+)\(")
_FUSION_KIND = re.compile(r"kind=(k\w+)")
_THREAD_ID = re.compile(r"/-?\d+$")
CONTROL_FLOW = ("while", "call", "conditional")


@dataclasses.dataclass(frozen=True)
class OpTime:
  """One HLO instruction's share of a call.

  Attributes:
    name: HLO instruction name (``fft.2``, ``transpose_copy_fusion.1``, ...).
    opcode: its HLO opcode; fusions read ``fusion(kLoop)`` etc.
    shape: its result shape, without the layout.
    seconds: summed event time per call.
    events: events per call (more than 1 where XLA splits an op).
    lanes: the threads or streams its events ran on.
  """

  name: str
  opcode: str
  shape: str
  seconds: float
  events: float
  lanes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ProgramProfile:
  """Per-instruction times of ``calls`` traced calls of one program.

  ``ops`` is sorted by ``seconds``, largest first. ``wall_seconds`` is the
  wall clock per call (each call waited for), ``busy_seconds`` the sum of
  ``ops`` (larger than the wall time where operations overlapped).
  """

  ops: tuple[OpTime, ...]
  calls: int
  wall_seconds: float
  covered_seconds: float = float("nan")

  @property
  def uncovered_seconds(self) -> float:
    """Wall time per call in which no instruction event was open.

    On CPU, multi-threaded ``dot`` and ``convolution`` thunks are
    asynchronous: their events cover the launch, and their kernels run on the
    pool workers afterwards. Their time lands here, with any idle time.
    """
    return max(0.0, self.wall_seconds - self.covered_seconds)

  @property
  def busy_seconds(self) -> float:
    """Summed operation time per call; control flow (``while``, ``call``,
    ``conditional``) is left out, its body's instructions have rows of their own."""
    return sum(op.seconds for op in self.ops if op.opcode not in CONTROL_FLOW)

  def by_opcode(self) -> dict[str, float]:
    """Seconds per call summed per opcode, largest first."""
    totals = collections.defaultdict(float)
    for op in self.ops:
      totals[op.opcode] += op.seconds
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

  def to_dict(self) -> dict:
    return {"calls": self.calls, "wall_seconds": self.wall_seconds,
            "busy_seconds": self.busy_seconds, "covered_seconds": self.covered_seconds,
            "uncovered_seconds": self.uncovered_seconds, "by_opcode": self.by_opcode(),
            "ops": [dataclasses.asdict(op) for op in self.ops]}


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """``{name: (opcode, shape)}`` for every instruction of an HLO module's text.

  Layouts (``{3,2,1,0}``) are dropped from the shapes; fusions carry their
  kind, e.g. ``fusion(kLoop)``.
  """
  table = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    opcode = m.group("opcode")
    if opcode == "fusion":
      kind = _FUSION_KIND.search(line)
      opcode = f"fusion({kind.group(1)})" if kind else opcode
    shape = re.sub(r"\{[^{}]*\}", "", m.group("shape")).strip()
    table[m.group("name")] = (opcode, shape)
  return table


def trace_events(logdir: str | Path) -> tuple[list[dict], dict]:
  """The complete (``ph == "X"``) events of the newest trace under ``logdir``,
  and ``{(pid, tid): lane name}`` from its metadata events."""
  files = sorted(Path(logdir).glob("plugins/profile/*/*.trace.json.gz"),
                 key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {logdir}/plugins/profile: did "
                            "jax.profiler.trace run there?")
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  lanes = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") in ("thread_name", "process_name"):
      key = (e.get("pid"), e.get("tid")) if e["name"] == "thread_name" else (e.get("pid"), None)
      lanes[key] = e.get("args", {}).get("name", "")
  return [e for e in events if e.get("ph") == "X"], lanes


def _instruction_name(event: dict) -> str | None:
  """The HLO instruction an event is for: its ``hlo_op`` argument where it
  has one (GPU kernels), else its name (CPU thunks)."""
  return event.get("args", {}).get("hlo_op") or event.get("name")


def op_times(events: list[dict], lanes: dict, instructions: dict[str, tuple[str, str]],
             calls: int) -> tuple[OpTime, ...]:
  """Folds trace events into one :class:`OpTime` per HLO instruction.

  An event belongs to an instruction when its name, or its ``hlo_op``
  argument (GPU kernels carry one), is an instruction name; the rest
  (Python frames, the executor's own spans, other programs) is dropped.
  The CPU path is what the tests check; the GPU one (``hlo_op``) has not
  yet been run on a GPU in this project.
  """
  if calls < 1:
    raise ValueError(f"calls must be >= 1, got {calls}")
  seconds = collections.defaultdict(float)
  count = collections.Counter()
  where = collections.defaultdict(set)
  for e in events:
    name = _instruction_name(e)
    if name not in instructions:
      continue
    seconds[name] += float(e.get("dur", 0.0)) * 1e-6   # trace times are microseconds
    count[name] += 1
    pid, tid = e.get("pid"), e.get("tid")
    where[name].add(lanes.get((pid, tid)) or lanes.get((pid, None)) or f"{pid}/{tid}")
  rows = [OpTime(name, *instructions[name], seconds=seconds[name] / calls,
                 events=count[name] / calls, lanes=_lane_summary(where[name]))
          for name in seconds]
  return tuple(sorted(rows, key=lambda r: -r.seconds))


def covered_seconds(events: list[dict], instructions: dict[str, tuple[str, str]],
                    calls: int) -> float:
  """Per call, the length of the union of the instructions' event intervals
  (control flow left out): the wall time in which some instruction ran."""
  def counted(e):
    entry = instructions.get(_instruction_name(e))
    return entry is not None and entry[0] not in CONTROL_FLOW

  spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
                 for e in events if counted(e))
  total, end = 0.0, float("-inf")
  for start, stop in spans:
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total * 1e-6 / calls


def _lane_summary(threads: set[str]) -> tuple[str, ...]:
  """``("tf_XLAEigen x2", "python")``: thread names without their numeric ids,
  with how many distinct threads of that name ran the instruction."""
  counts = collections.Counter(_THREAD_ID.sub("", t) for t in threads)
  return tuple(sorted(f"{n} x{c}" if c > 1 else n for n, c in counts.items()))


def profile(compiled, *args, calls: int = 2, logdir: str | Path | None = None,
            run: Callable[[], object] | None = None) -> ProgramProfile:
  """Runs ``compiled(*args)`` once untraced, then ``calls`` times traced.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``);
      its HLO text names the instructions.
    *args: its arguments (not donated: use ``run`` for a step that donates).
    calls: traced calls; each is waited for before the next.
    logdir: where the trace goes (default: a temporary directory, removed).
    run: a zero-argument callable making one call and returning what to wait
      for, e.g. a train step threading its donated state; replaces
      ``compiled(*args)``.

  Returns:
    A :class:`ProgramProfile`.
  """
  if calls < 1:
    raise ValueError(f"calls must be >= 1, got {calls}")
  one = run if run is not None else (lambda: compiled(*args))
  jax.block_until_ready(one())      # warm-up outside the trace
  instructions = hlo_instructions(compiled.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    where = Path(logdir) if logdir is not None else Path(tmp)
    with jax.profiler.trace(str(where)):
      t0 = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(one())
      wall = (time.perf_counter() - t0) / calls
    events, lanes = trace_events(where)
  return ProgramProfile(op_times(events, lanes, instructions, calls), calls, wall,
                        covered_seconds(events, instructions, calls))


def _ms(seconds: float) -> str:
  ms = seconds * 1e3
  return f"{ms:,.1f}" if ms >= 1 else f"{ms:.3g}"


def profile_table(prof: ProgramProfile, top: int = 20) -> str:
  """Markdown: the ``top`` instructions, then the per-opcode totals."""
  wall = prof.wall_seconds
  lines = [f"{prof.calls} traced call(s): {_ms(wall)} ms wall per call, {_ms(prof.busy_seconds)} "
           f"ms of instruction events per call; {_ms(prof.uncovered_seconds)} ms of the wall "
           "time had no instruction event open (on CPU: asynchronous dot and convolution "
           "kernels, whose events cover only their launch, and idle time)", "",
           "| instruction | opcode | shape | ms / call | % of wall | lanes |",
           "|---|---|---|---|---|---|"]
  for op in prof.ops[:top]:
    lanes = ", ".join(op.lanes)
    lines.append(f"| {op.name} | {op.opcode} | {op.shape} | {_ms(op.seconds)} | "
                 f"{100 * op.seconds / wall:.1f} | {lanes} |")
  if len(prof.ops) > top:
    rest = sum(op.seconds for op in prof.ops[top:])
    lines.append(f"| ({len(prof.ops) - top} more) | | | {_ms(rest)} | "
                 f"{100 * rest / wall:.1f} | |")
  lines += ["", "| opcode | ms / call | % of wall |", "|---|---|---|"]
  for opcode, s in prof.by_opcode().items():
    lines.append(f"| {opcode} | {_ms(s)} | {100 * s / wall:.1f} |")
  return "\n".join(lines)
