"""Orbax checkpoints of {train state, data iterator}.

Saves are asynchronous (training continues while tensorstore writes) and
atomic: orbax writes into a temporary directory and renames it when complete,
so an interrupted save never leaves a checkpoint that blocks resume. Restores
go through abstract arrays that carry the *current* mesh's shardings, so a
checkpoint written on one mesh shape restores onto another.

What goes wrong, and what happens (docs/troubleshooting.md):
- A save that fails (a full disk, a directory that vanished or is read-only)
  is noticed at the next step or save (`check_saved`): CheckpointError names
  the step, the directory, the cause and the last intact checkpoint. Orbax's
  own error logs (a traceback per background thread) are folded into that
  one message unless LM_VERBOSE is set.
- A checkpoint that cannot be read (a truncated, garbled or missing file) is
  skipped: `restore_latest` falls back to the newest one that restores,
  moves the bad ones to checkpoints/corrupt/ (a training run only; readers
  such as eval leave the directory alone) and says so; CheckpointError only
  when none restores, with nothing moved.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lm import paths
from lm.checks import UserError

CORRUPT = "corrupt"  # checkpoints/corrupt/STEP: unreadable, kept for a look.


class CheckpointError(UserError):
  """A checkpoint could not be written or none could be read."""


def reason(error: BaseException) -> str:
  """The cause at the end of an orbax/tensorstore message, e.g. "No space
  left on device [os_error_code='28']", rather than the whole chain."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__  # The innermost says why.
  text = " ".join(str(error).split()) or type(error).__name__
  return text.rsplit(": ", 1)[-1] if len(text) > 200 else text


def _verbose() -> bool:
  """LM_VERBOSE (set by a script's --verbose, lm/run/cli.py): show orbax's
  own error logs too."""
  return os.environ.get("LM_VERBOSE", "") not in ("", "0")


class _OrbaxErrors(logging.Filter):
  """Keeps the first error orbax logs from its background threads (a failed
  save) and, unless LM_VERBOSE is set, drops those records: their cause
  reaches the user once, in CheckpointError."""

  def __init__(self):
    super().__init__()
    self.first: str | None = None

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "/orbax/" not in record.pathname:
      return True
    if self.first is None:
      error = record.exc_info[1] if record.exc_info else None
      self.first = reason(error) if error else record.getMessage()
    return _verbose()


@functools.cache  # Once per process: orbax warns at each registration.
def _one_writer_per_array() -> None:
  """One process on simulated CPU devices writes every replica of every
  array itself, so orbax's replica-parallel saving (each replica writes a
  slice of a replicated shard: spreads the writes over hosts and chips)
  only adds work there: a compiled slice program per shard shape and
  device, 56 of them (11 s) for the tiny LM on 8 simulated devices. Off for
  that case only; several processes, GPUs and TPUs keep orbax's default.
  The handler is orbax's default one otherwise (its array metadata store
  keeps typed PRNG keys typed; orbax has no public getter for it)."""
  if jax.process_count() > 1 or jax.default_backend() != "cpu":
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  absl_log = logging.getLogger("absl")  # Orbax warns that it overrides.
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False,
            array_metadata_store=getattr(default, "_array_metadata_store",
                                         None)),
        override=True)
  finally:
    absl_log.setLevel(level)


class Checkpointer:

  def __init__(self, directory: str | Path, *, max_to_keep: int = 3,
               async_save: bool = True, ocdbt: bool = True):
    """`ocdbt=False` writes each array as its own tensorstore (zarr) files
    rather than into OCDBT's shared database: no host buffering (OCDBT's
    held about 70% of the state's bytes on the host while writing, measured
    on CPU), many more files. Restoring reads either."""
    _one_writer_per_array()
    self.directory = paths.resolve(directory)
    handlers = ({} if ocdbt else {
        "state": ocp.StandardCheckpointHandler(use_ocdbt=False)})
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # An interrupted save leaves a temp dir: remove it, never read it.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save),
        item_names=("state", "data"), item_handlers=handlers or None)
    self._errors = _OrbaxErrors()
    logging.getLogger("absl").addFilter(self._errors)
    self._pending: int | None = None  # Saved, not yet known to be complete.
    self.last_intact = self.manager.latest_step()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator=None, *,
           force: bool = False) -> bool:
    """Starts an async save (after checking that the previous one is
    complete); the loop decides when one is due."""
    self.check_saved(wait=True)
    if not paths.is_remote(self.directory) and not (
        self.directory.is_dir() and os.access(self.directory, os.W_OK)):
      # Checked here because orbax, failing to make its temporary
      # directory in a background thread, waits for it forever.
      self._fail(step, None, f"{self.directory} is no longer a writable "
                 "directory")
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      started = self.manager.save(step, args=ocp.args.Composite(**items),
                                  force=force)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds.
      self._fail(step, e)
    self._pending = step if started else None
    return started

  def check_saved(self, wait: bool = False) -> None:
    """Raises CheckpointError if the last save ended without its checkpoint.
    Without `wait`, returns at once while that save is still writing."""
    if self._pending is None:
      return
    if not wait and self.manager.is_saving_in_progress():
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds.
      self._fail(step, e)
    self.manager.reload()  # What is on disk, not what orbax expected.
    if step not in self.manager.all_steps():
      self._fail(step, None)
    self.last_intact = step

  def _fail(self, step: int, error: BaseException | None,
            cause: str | None = None):
    cause = cause or self._errors.first or (
        reason(error) if error else "orbax did not finish writing it")
    last = (f"step {self.last_intact}" if self.last_intact is not None
            else "none yet (a rerun starts at step 0)")
    raise CheckpointError(
        f"saving checkpoint step {step} in {self.directory} failed: {cause}. "
        f"The last intact checkpoint is {last}; nothing half-written is left "
        "where a resume would read it. Fix the cause (free space, a "
        "writable directory) and rerun the same command to resume."
    ) from error

  def restore(self, abstract_state: Any, data_iterator=None,
              step: int | None = None) -> Any:
    """Restores the state onto `abstract_state`'s shardings (and the iterator
    in place). Returns the state."""
    step = self.latest_step() if step is None else step
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    other_count_state = None
    # A checkpoint written without a data iterator (an imported model)
    # leaves the iterator at the start of the data.
    has_data = (self.directory / str(step) / "data").exists()
    if data_iterator is not None and has_data:
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

  def restore_latest(self, abstract_state: Any, data_iterator=None, *,
                     quarantine: bool, warn: Callable[[str], None]
                     ) -> tuple[int, Any]:
    """(step, state) of the newest checkpoint that restores. Unreadable
    newer ones are reported through `warn`, and with `quarantine` moved to
    checkpoints/corrupt/ (process 0 moves; every process waits for it)."""
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self.restore(abstract_state, data_iterator, step)
      except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways.
        failed.append((step, reason(e)))
        continue
      if failed:
        moved = self._quarantine([s for s, _ in failed]) if quarantine else {}
        for bad, why in failed:
          warn(f"checkpoint step {bad} in {self.directory} cannot be read "
               f"({why}); "
               + (f"moved it to {moved[bad]} (nothing deleted) and "
                  if bad in moved else "")
               + f"using step {step}, the newest intact checkpoint."
               + (f" Steps {step + 1} to {failed[0][0]} will be trained "
                  "again." if quarantine else ""))
      self.last_intact = step
      return step, state
    if not failed:
      raise CheckpointError(f"no checkpoint in {self.directory}: train first "
                            "(scripts/train.py).")
    raise CheckpointError(
        f"no checkpoint in {self.directory} can be read: "
        + "; ".join(f"step {s}: {why}" for s, why in failed)
        + ". Nothing was moved. To start again from scratch, move "
        f"{self.directory} aside.")

  def _quarantine(self, steps: list[int]) -> dict[int, Path]:
    """Moves each step's directory under checkpoints/corrupt/ (a new name
    if one is there already); returns where each went."""
    moved = {}
    for step in steps:
      target = self.directory / CORRUPT / str(step)
      n = 1
      while target.exists():
        target = self.directory / CORRUPT / f"{step}.{n}"
        n += 1
      moved[step] = target
      if jax.process_index() == 0:
        target.parent.mkdir(exist_ok=True)
        shutil.move(self.directory / str(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("lm_checkpoint_quarantine")
    self.manager.reload()
    return moved

  def wait(self) -> None:
    """Blocks until the last save is complete (CheckpointError if it
    failed)."""
    self.check_saved(wait=True)

  def close(self) -> None:
    try:
      self.check_saved(wait=True)
    finally:
      self.manager.close()
      logging.getLogger("absl").removeFilter(self._errors)
