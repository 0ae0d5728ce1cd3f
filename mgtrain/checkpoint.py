"""Checkpoints of a training run: TrainState and history together (orbax).

A checkpoint's step number is the run's global optimizer step, so a resumed
run knows which Full-Multiscale stage it is in before it restores anything,
and can build the right abstract state for that stage's optimizer. The
history (losses, evaluations, elapsed wall time) is saved beside the state so
a resumed run reports the same curves and timings as an uninterrupted one.

Example:
  >>> ckpt = Checkpointer("/tmp/run/checkpoints", every=100)  # doctest: +SKIP
  >>> ckpt.save(step, state, history)                         # doctest: +SKIP
  >>> state, history = ckpt.restore(ckpt.latest_step(), abstract_state)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over ``orbax.checkpoint.CheckpointManager``.

  Args:
    directory: where checkpoints live (created if needed).
    every: save every ``every`` global steps (``save`` with ``force=True``
      saves regardless, e.g. at the end of a stage or run).
    max_to_keep: how many recent checkpoints to retain.
  """

  def __init__(self, directory: str | os.PathLike, every: int, max_to_keep: int = 2):
    if every < 1:
      raise ValueError(f"checkpoint interval must be >= 1, got {every}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.every = every
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return step % self.every == 0

  def save(self, step: int, state: Any, history: dict, force: bool = False) -> bool:
    """Saves ``state`` and ``history`` under ``step`` (if due or forced)."""
    if not force and not self.should_save(step):
      return False
    if step in self._manager.all_steps():
      return False
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      history=ocp.args.JsonSave(history)),
        force=force)
    self._manager.wait_until_finished()
    return bool(saved)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores ``(state, history)``; ``abstract_state`` gives the structure."""
    restored = self._restore(step, state=ocp.args.StandardRestore(abstract_state),
                             history=ocp.args.JsonRestore())
    return restored["state"], restored["history"]

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """The state saved under ``step`` alone, for a caller that has read the
    history already (:meth:`restore_history`)."""
    return self._restore(step, state=ocp.args.StandardRestore(abstract_state))["state"]

  def restore_history(self, step: int) -> dict:
    """The history saved under ``step`` alone, without the state: what a
    resuming run checks before it builds the state's structure."""
    return self._restore(step, history=ocp.args.JsonRestore())["history"]

  def _restore(self, step: int, **items):
    return self._manager.restore(step, args=ocp.args.Composite(**items))

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
