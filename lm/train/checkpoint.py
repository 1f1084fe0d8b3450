"""Orbax checkpoints of {train state, data iterator}.

Saves are asynchronous (training continues while tensorstore writes) and
atomic: orbax writes into a temporary directory and renames it when complete,
so an interrupted save never leaves a checkpoint that blocks resume. Restores
go through abstract arrays that carry the *current* mesh's shardings, so a
checkpoint written on one mesh shape restores onto another.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
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
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
