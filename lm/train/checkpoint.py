"""Orbax checkpoints of {train state, data iterator}.

Saves are asynchronous (training continues while tensorstore writes) and
atomic: orbax writes into a temporary directory and renames it when complete,
so an interrupted save never leaves a checkpoint that blocks resume. Restores
go through abstract arrays that carry the *current* mesh's shardings, so a
checkpoint written on one mesh shape restores onto another.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from lm import paths


class Checkpointer:

  def __init__(self, directory: str | Path, *, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = paths.resolve(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # An interrupted save leaves a temp dir: remove it, never read it.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator=None, *,
           force: bool = False) -> bool:
    """Starts an async save; the loop decides when one is due."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items),
                             force=force)

  def restore(self, abstract_state: Any, data_iterator=None,
              step: int | None = None) -> Any:
    """Restores the state onto `abstract_state`'s shardings (and the iterator
    in place). Returns the state."""
    step = self.latest_step() if step is None else step
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    other_count_state = None
    if data_iterator is not None:
      other_count_state = self._data_state_of_other_process_count(step)
      if other_count_state is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if other_count_state is not None:
      data_iterator.set_state(other_count_state)
    return restored["state"]

  def _data_state_of_other_process_count(self, step: int) -> dict | None:
    """grain saves one iterator state per process (process_I-of-N.json).
    Our pipelines make every process's state the same position in the
    global batch sequence, so a job with another process count resumes from
    it; None when this job's own file is there."""
    folder = self.directory / str(step) / "data"
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if (folder / name).exists() or not folder.exists():
      return None
    states = [json.loads(f.read_text()) for f in folder.glob("process_*.json")]
    if not states or any(s != states[0] for s in states):
      raise ValueError(
          f"{folder} holds the data-iterator states of another number of "
          f"processes, and they differ ({states}); resume with the process "
          "count that wrote it.")
    return states[0]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
