"""One writer per run directory: `workdir/run.lock`, held by the training
run (process 0 of a job) from before it writes anything until it exits.

The file says who holds it ({"host", "pid", "refreshed"}); a thread
rewrites `refreshed` every REFRESH_S seconds. Another train.py on the same
directory exits at once, naming the holder. A lock left by a process that
died (kill -9, a crashed host) is taken over with a warning when its process
is gone from this host, or when nobody has refreshed it for STALE_S seconds.
Readers (eval, generate, quantize's source) never take it.

Object stores (gs://, s3://) have no atomic create-if-absent that this
file could rely on: there the run logs that nothing stops a second writer,
and keeping to one is the job scheduler's (e.g. one job name per run).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from lm import paths
from lm.checks import UserError

NAME = "run.lock"
REFRESH_S = 30.0
STALE_S = 600.0


class LockedError(UserError):
  """Another live process is training in this run directory."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's process: alive.
    return True
  return True


def _read(path: Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None  # Gone, or half-written by a writer that died mid-write.


class RunLock:
  """`with RunLock(workdir, log):` holds the directory's lock."""

  def __init__(self, workdir: str | Path, warn: Callable[[str], None]):
    self.workdir = paths.resolve(workdir)
    self.path = self.workdir / NAME
    self.warn = warn
    self.me = {"host": socket.gethostname(), "pid": os.getpid()}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> RunLock:
    if paths.is_remote(self.workdir):
      self.warn(f"{self.workdir} is on an object store: no lock file "
                "protects it, so make sure one job writes it at a time.")
      return self
    while not self._create():
      holder = _read(self.path)
      if holder is None:  # Removed or half-written: look again.
        time.sleep(0.1)
        if _read(self.path) is None:
          self.path.unlink(missing_ok=True)
        continue
      why = self._stale(holder)
      if why is None:
        age = time.time() - holder.get("refreshed", 0)
        raise LockedError(
            f"{self.workdir} is in use by process {holder.get('pid')} on "
            f"{holder.get('host')} (its lock {self.path} was refreshed "
            f"{age:.0f} s ago): one training run per directory. Wait for "
            "it, stop it, or use another --workdir. (eval.py and "
            "generate.py may read it meanwhile.)")
      self.warn(f"taking over the lock of {self.workdir}: {why}.")
      self.path.unlink(missing_ok=True)
    self._thread = threading.Thread(target=self._refresh, daemon=True,
                                    name="run-lock-refresh")
    self._thread.start()
    return self

  def _create(self) -> bool:
    """Writes the lock file if there is none (O_EXCL: atomic on POSIX)."""
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(self._content())
    return True

  def _content(self) -> str:
    return json.dumps({**self.me, "refreshed": time.time()}) + "\n"

  def _stale(self, holder: dict) -> str | None:
    """Why `holder`'s lock is dead, or None if it may be alive."""
    age = time.time() - holder.get("refreshed", 0)
    if holder.get("host") == self.me["host"] and not _alive(
        int(holder.get("pid", -1))):
      return (f"process {holder.get('pid')} on this host, which held it, "
              "is gone")
    if age > STALE_S:
      return (f"process {holder.get('pid')} on {holder.get('host')} last "
              f"refreshed it {age:.0f} s ago (more than {STALE_S:.0f} s)")
    return None

  def _refresh(self) -> None:
    while not self._stop.wait(REFRESH_S):
      if self._mine():
        tmp = self.path.with_name(f"{NAME}.{os.getpid()}.tmp")
        tmp.write_text(self._content())
        tmp.replace(self.path)

  def _mine(self) -> bool:
    holder = _read(self.path) or {}
    return all(holder.get(k) == v for k, v in self.me.items())

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      if self._mine():
        self.path.unlink(missing_ok=True)
