"""A `jax.profiler` trace of a window of training steps
(config.train.profile_steps = (start, stop)), viewable in TensorBoard's
profile plugin or XProf (docs/tracking.md).

The trace starts before the step that begins with `start` steps done and
stops once `stop` steps are done and their results are ready, so it holds
stop - start whole steps, each marked with a `StepTraceAnnotation("train",
step_num=<steps done before it>)`: the steps XProf's step-time views count.
It goes where the TensorBoard logdir is, WORKDIR/tensorboard/plugins/
profile/<session>/<host>.xplane.pb, so `tensorboard --logdir WORKDIR` shows
the scalars and the profile together.

A resumed run that starts inside the window traces the rest of it; one that
starts after it traces nothing. A run that stops inside the window (a
signal, stop_at_step, an error) still writes what it traced. Only process 0
traces (as MaxText does by default): in SPMD every process runs the same
program, and processes on one host would write the same file name.
"""
from __future__ import annotations

import contextlib

import jax

from lm import cpu, paths
from lm.run.metrics_log import log


class Window:

  def __init__(self, profile_steps, workdir):
    self.steps = tuple(profile_steps)
    self.enabled = bool(self.steps) and jax.process_index() == 0
    self.directory = paths.resolve(workdir) / "tensorboard"
    self.tracing = False
    self.traced: list[int] = []  # step_num of the steps traced so far.

  @contextlib.contextmanager
  def step(self, done: int):
    """Around the input and dispatch of the step that starts with `done`
    steps done: starts the trace at the window's first step, and marks the
    step (XProf's step views count input time inside the marker)."""
    if self.enabled and not self.tracing:
      start, stop = self.steps
      if start <= done < stop:
        if cpu.libtpu_profiler_on_cpu():
          log("profiling on the CPU with libtpu installed: jax's TPU probe "
              "loaded libtpu's profiler, which slows the traced steps and "
              "inflates their kernels' times; for a faithful profile run "
              "with JAX_PLATFORMS=cpu (docs/tracking.md)")
        jax.profiler.start_trace(str(self.directory))
        self.tracing = True
    if self.tracing:
      self.traced.append(done)
    with jax.profiler.StepTraceAnnotation("train", step_num=done):
      yield

  def ends_at(self, done: int) -> bool:
    """Whether the trace ends after `done` steps: the loop then waits for
    every step dispatched so far, so the trace holds their device work."""
    return self.tracing and done >= self.steps[1]

  def after(self, done: int) -> None:
    """After a step (and the wait `ends_at` asked for): writes the trace
    once `stop` steps are done."""
    if self.ends_at(done):
      self.close()

  def close(self) -> None:
    """Writes the trace if one is running (the end of the run, a stop)."""
    if not self.tracing:
      return
    self.tracing = False
    jax.profiler.stop_trace()
    first, last = self.traced[0], self.traced[-1]
    which = (f"step_num {first}" if first == last
             else f"step_num {first} to {last}")
    log(f"profile of {len(self.traced)} step(s) ({which}) written to "
        f"{self.directory}/plugins/profile/: view it with tensorboard "
        f"--logdir {self.directory} (docs/tracking.md)")
