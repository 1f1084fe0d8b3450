"""How every script starts and fails: absl flags, then `main`; a mistake the
user fixes (a config value, a flag, a file, the run directory) ends the
process with one line on stderr, `error: ...`, and exit status 1, never a
traceback. `--verbose` (or LM_VERBOSE=1) shows the traceback too.

What counts as the user's mistake: lm.checks.UserError (ConfigError,
DataError, QuantError, UsageError, CheckpointError, DistributedError, a
non-finite loss) and OSError (a missing file, a full disk, a read-only
directory), plus any flag that does not parse, including a config file that
does not exist or whose get_config raises. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable

from absl import app, flags

from lm import cpu
from lm.checks import UserError

_VERBOSE = flags.DEFINE_boolean(
    "verbose", False, "On an error, print the traceback as well as the "
    "one-line message (also LM_VERBOSE=1).")
# A config-file flag's value: PATH.py or PATH.py:ARG.
_CONFIG_VALUE = re.compile(r"^--(?P<flag>\w+)=(?P<path>[^:]+\.py)(:.*)?$")


def distributed_flags() -> Callable[[], str]:
  """Defines the flags of a multi-process job (every host runs the same
  command; scripts/launch_local.py adds them on one machine) and returns
  the function that joins it: call it in `main` before anything starts a
  JAX backend. SLURM, Open MPI and Cloud TPU are detected without flags."""
  coordinator = flags.DEFINE_string(
      "coordinator_address", None, "HOST:PORT of process 0's coordination "
      "service, for a multi-process job.")
  num_processes = flags.DEFINE_integer(
      "num_processes", None, "Processes in the job (all hosts together).")
  process_id = flags.DEFINE_integer(
      "process_id", None, "This process's index in [0, num_processes).")
  init_timeout = flags.DEFINE_integer(
      "initialization_timeout", 300, "Seconds to wait for all processes to "
      "join before failing.")
  heartbeat_timeout = flags.DEFINE_integer(
      "heartbeat_timeout", 100, "Seconds without a heartbeat after which a "
      "process counts as dead and the job ends on every process.")

  def initialize() -> str:
    from lm import distributed  # noqa: PLC0415 - jax reads XLA_FLAGS late.
    return distributed.initialize(
        coordinator.value, num_processes.value, process_id.value,
        initialization_timeout=init_timeout.value,
        heartbeat_timeout=heartbeat_timeout.value)
  return initialize


def verbose() -> bool:
  return ((flags.FLAGS.is_parsed() and _VERBOSE.value)
          or os.environ.get("LM_VERBOSE", "") not in ("", "0"))


def fail(message: str) -> None:
  """Ends the process with `error: message` (one line) and status 1."""
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(1)


def _missing_config_file(argv: list[str]) -> str | None:
  """The message for a config file that does not exist, naming the ones
  that do; config_flags itself only fails later, without the path."""
  for arg in argv[1:]:
    match = _CONFIG_VALUE.match(arg)
    if not match or Path(match["path"]).exists():
      continue
    folder = Path(match["path"]).parent
    folder = folder if folder.is_dir() else Path("configs")
    files = sorted(str(p) for p in folder.glob("*.py")
                   if "def get_config" in p.read_text())
    return (f"--{match['flag']}: {match['path']} does not exist"
            + (f"; config files: {', '.join(files)}." if files else "."))
  return None


def flag_error_line(message: str) -> str:
  """absl's message for a flag that did not parse, as one line: the flag,
  then the last line of what went wrong (config_flags puts the whole
  traceback of a failing get_config into the message)."""
  lines = [line.strip() for line in message.strip().splitlines()
           if line.strip()]
  first = re.sub(r"^flag ", "", lines[0])
  if len(lines) == 1:
    return first
  first = re.sub(r":\s*Error whilst parsing config file:?$", "", first)
  last = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
  return f"{first}: {last}"


def _parse_flags(argv: list[str]) -> list[str]:
  missing = _missing_config_file(argv)
  if missing:
    fail(missing)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(flag_error_line(str(e)) + " (--helpshort lists the flags)")
  except (AttributeError, KeyError) as e:  # A --config.a.b override.
    fail(unknown_override_line(e, argv))


def unknown_override_line(error: Exception, argv: list[str]) -> str:
  """config_flags' error for an override of a key the config lacks, as one
  line naming the flag (its message is the key, then a suggestion)."""
  chain = []  # ml_collections re-raises the KeyError as AttributeError(repr).
  while error is not None:
    chain.append(str(error.args[0]) if error.args else "")
    error = error.__context__
  text = next((t for t in chain if "\n" in t), chain[-1])
  key, *hint = [line.strip().strip("'\"") for line in text.splitlines()]
  arg = next((a for a in argv[1:] if re.match(
      rf"^--\w+(\.\w+)*\.{re.escape(key)}(\.|=|$)", a)), "a --config override")
  return (f"{arg}: the config has no key {key!r}"
          + (f"; {' '.join(hint)}" if hint else ""))


def _closed_event_loop(value) -> bool:
  """tensorstore's error for each write still queued when a failed
  checkpoint save ends orbax's event loop: hundreds of tracebacks around
  the one line that says what failed. Shown only with --verbose."""
  return (isinstance(value, RuntimeError)
          and str(value) == "Event loop is closed" and not verbose())


def _from_orbax(error: BaseException | None) -> bool:
  """Whether the error (or one it was raised from) passed through orbax."""
  while error is not None:
    tb = error.__traceback__
    while tb is not None:
      if "/orbax/" in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    error = error.__cause__ or error.__context__
  return False


class _OrbaxLeftoverLogs(logging.Filter):
  """asyncio's "Task/Future exception was never retrieved" for an orbax
  read nobody awaits any more (a restore that failed on one array leaves
  the others' behind). It is logged whenever the task is collected, even
  after the checkpoint is closed, so the filter stays for the process."""

  def filter(self, record: logging.LogRecord) -> bool:
    if verbose() or "exception was never retrieved" not in record.getMessage():
      return True
    return not _from_orbax(record.exc_info[1] if record.exc_info else None)


def _quiet_hooks() -> None:
  logging.getLogger("asyncio").addFilter(_OrbaxLeftoverLogs())
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
  sys.excepthook = lambda kind, value, tb: (
      None if _closed_event_loop(value) else excepthook(kind, value, tb))
  sys.unraisablehook = lambda u: (
      None if _closed_event_loop(u.exc_value) or _orbax_leftover(u)
      else unraisablehook(u))


def _orbax_leftover(unraisable) -> bool:
  """An orbax coroutine's error that nobody awaited any more: a restore
  that failed on one array (a damaged checkpoint) leaves the reads of the
  others behind. The failure itself is reported (and acted on) once; as
  for _OrbaxLeftoverLogs."""
  code = getattr(unraisable.object, "cr_code", None)
  return (code is not None and "/orbax/" in code.co_filename
          and not verbose())


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main) with the error handling above; first, on a CPU backend,
  malloc with huge pages (lm/cpu.py: re-runs the script once if needed)."""
  cpu.use_huge_pages()
  def guarded(argv):
    _quiet_hooks()  # Here: absl has installed its own excepthook by now.
    if _VERBOSE.value:  # The library's own quiet spots read the environment.
      os.environ["LM_VERBOSE"] = "1"
    try:
      return main(argv)
    except (UserError, OSError) as e:
      if verbose():
        raise
      fail(str(e) or type(e).__name__)
  app.run(guarded, flags_parser=_parse_flags)
