"""Where a run's wall time goes (the "goodput" view): compile, step, data,
eval, checkpoint, startup and idle seconds, from the host's monotonic clock.

Every second between the start of `loop.train` and its end goes to exactly
one part: the innermost phase the loop is in (`with breakdown.phase("data")`),
or, outside every phase, `startup` until the first step and `idle` after it
(logging, the progress line, Python between phases, writing a profile
trace). Compiling is taken out of whichever phase it happened in: JAX
reports the duration of every trace, lowering and XLA compile (or
persistent-cache load) on the loop's thread (`jax.monitoring`), and those
seconds move to `compile`. So the parts always add up to `wall_s`.

`step` is the host waiting for the device: dispatching a step, and blocking
where the loop already blocks to read a step's loss (at most
`loop.MAX_IN_FLIGHT` steps behind). Reading the next batch while steps run
counts as `data`, though the device may be busy meanwhile: this is the
host's view, as MaxText's goodput recorder and torchtitan's data-loading
time take it. `goodput` = step_s / wall_s.

The run's totals so far are in WORKDIR/time.json, rewritten at each log
line and at the end of each attempt (after the last eval and the last
checkpoint's background write); metrics.jsonl gets them as a `time`
record at each log line. A resumed run continues the totals of time.json,
so both describe the whole run; `attempts` counts the processes that
trained it. Time an attempt spent after its last write of time.json (a
process killed outright) is not in them.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time

import jax

from lm import paths

PARTS = ("compile", "step", "data", "eval", "checkpoint", "startup", "idle")
# JAX's events for making a program; they do not nest (tracing is reported
# for the outermost jit only; lowering and the XLA compile come after it).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
SPLIT = "time"  # The records' split in metrics.jsonl.
FILE = "time.json"


class Breakdown:
  """The loop's clock. Use as a context manager: it listens to JAX's compile
  events while open."""

  def __init__(self):
    self.seconds = dict.fromkeys(PARTS, 0.0)
    self.before = dict.fromkeys(PARTS, 0.0)  # Of the earlier attempts.
    self.attempt = 1
    self.path = None  # WORKDIR/time.json, once the run directory exists.
    self._stack: list[str] = []
    self._base = "startup"  # Outside every phase; `idle` after a step.
    self._thread = threading.get_ident()
    self._since = time.monotonic()

  def __enter__(self) -> Breakdown:
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def __exit__(self, *exc) -> None:
    self._charge()
    jax.monitoring.unregister_event_duration_listener(self._on_event)

  def open(self, workdir, resumed: bool) -> None:
    """Saves to WORKDIR/time.json from now on; a resumed run first
    continues the totals there (none there: only the count goes on)."""
    self.path = paths.resolve(workdir) / FILE
    if resumed:
      before = json.loads(self.path.read_text()) if self.path.exists() else {}
      self.before = {p: float(before.get(f"{p}_s", 0.0)) for p in PARTS}
      self.attempt = int(before.get("attempts", 1)) + 1

  def _current(self) -> str:
    return self._stack[-1] if self._stack else self._base

  def _charge(self) -> None:
    """The seconds since the last change of phase go to the current one."""
    now = time.monotonic()
    self.seconds[self._current()] += now - self._since
    self._since = now

  @contextlib.contextmanager
  def phase(self, part: str):
    if part not in PARTS:
      raise ValueError(f"unknown part {part!r}; one of {PARTS}")
    self._charge()
    self._stack.append(part)
    try:
      # Named in a profile trace too (lm/run/profiler.py); a no-op without.
      with jax.profiler.TraceAnnotation(part):
        yield
    finally:
      self._charge()
      self._stack.pop()
      if part == "step":
        self._base = "idle"

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    # The compile happened inside the current phase, which is charged the
    # whole interval when it ends: move these seconds out of it now.
    if event in COMPILE_EVENTS and threading.get_ident() == self._thread:
      self.seconds[self._current()] -= duration
      self.seconds["compile"] += duration

  def record(self) -> dict[str, float]:
    """The whole run's totals so far: `PART_s`, `wall_s`, `goodput` and
    `attempts` (a `time` record of metrics.jsonl)."""
    self._charge()
    out = {f"{p}_s": self.before[p] + self.seconds[p] for p in PARTS}
    out["wall_s"] = sum(out.values())
    out["goodput"] = out["step_s"] / max(out["wall_s"], 1e-9)
    out["attempts"] = self.attempt
    return out

  def save(self, step: int) -> dict[str, float]:
    """The record, also written to WORKDIR/time.json (by process 0)."""
    out = self.record()
    if self.path is not None and jax.process_index() == 0:
      tmp = self.path.parent / f"{FILE}.tmp"
      tmp.write_text(json.dumps({"step": step, **out}, indent=1) + "\n")
      tmp.replace(self.path)  # Atomic: a resume never reads half a file.
    return out


def summary(record: dict[str, float]) -> str:
  """One line for the end of an attempt, largest part first."""
  wall = max(record["wall_s"], 1e-9)
  attempts = int(record["attempts"])
  parts = sorted(PARTS, key=lambda p: -record[f"{p}_s"])
  return (f"time {record['wall_s']:,.1f} s"
          + (f" over {attempts} attempts" if attempts > 1 else "") + ": "
          + ", ".join(f"{p} {record[f'{p}_s']:,.1f} s "
                      f"({100 * record[f'{p}_s'] / wall:.0f}%)" for p in parts)
          + f" | goodput {100 * record['goodput']:.0f}%")
