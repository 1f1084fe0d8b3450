"""The training loop: resolve and check the config -> mesh -> sharded state
(restored if a checkpoint exists) -> data -> jitted steps -> metrics, evals,
checkpoints.

The loop never has more than `MAX_IN_FLIGHT` steps dispatched ahead of the
host: it reads each step's loss (a scalar) one step behind, which also lets it
stop on the first non-finite loss. Unbounded async dispatch over many
simulated devices can trip XLA:CPU's collective rendezvous timeout.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm import paths, tasks
from lm.checks import UserError
from lm.parallel import make_mesh, rules as rules_lib
from lm.parallel import pipeline
from lm.parallel.mesh import batch_share, describe
from lm.run import checks, goodput, lock as lock_lib, perf, profiler as \
    profiler_lib, restore, wandb_sink
from lm.run.metrics_log import MetricsLog, log
from lm.train import checkpoint as ckpt_lib
from lm.train import accountant, distill, lora, privacy, prune
from lm.train import state as state_lib
from lm.train import step as step_lib

MAX_IN_FLIGHT = 2


class NonFiniteLossError(UserError, FloatingPointError):
  pass


class _StopSignals:
  """SIGTERM / SIGINT ask the loop to checkpoint and exit; `stop(step)` says
  when, and on a multi-process job it is the same step on every process.

  One process: a Python handler sets a flag that the next step reads.
  Several processes: JAX's preemption sync manager (started by
  `jax.distributed.initialize`) catches SIGTERM on any process, and
  `reached_preemption_sync_point(step)` turns true at the same step on all
  of them, so they save one checkpoint together. SIGINT is forwarded to it as
  SIGTERM. A second Ctrl-C interrupts at once (orbax discards the partial
  save).
  """

  def __init__(self):
    self.requested: str | None = None
    self.multiprocess = jax.process_count() > 1
    self._old = {}

  def __enter__(self):
    signals = (signal.SIGINT,) if self.multiprocess else (signal.SIGTERM,
                                                          signal.SIGINT)
    for sig in signals:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Python handles signals on the main thread only.
        log(f"not on the main thread: {signal.Signals(sig).name} is not "
            "handled here (no checkpoint on it); stop this run with "
            "stop_at_step, or run it on the main thread.")
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name
    if self.multiprocess:  # JAX's handler takes it from here.
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      log(f"{self.requested} received: saving a checkpoint, then stopping.")

  def stop(self, step: int) -> bool:
    if not self.multiprocess:
      return self.requested is not None
    if multihost_utils.reached_preemption_sync_point(step):
      self.requested = self.requested or "SIGTERM"
      log(f"SIGTERM on a process of the job: all {jax.process_count()} "
          f"processes save step {step}, then stop.")
      return True
    return False

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def write_config(config, workdir: Path) -> None:
  if jax.process_index() != 0:
    return
  tmp = workdir / "config.json.tmp"
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  tmp.replace(workdir / "config.json")  # Atomic: never a half-written file.


def evaluate(task, eval_step, params, data, setup, *, workdir=None,
             step: int = 0) -> dict[str, float]:
  """Runs the eval step over every eval batch; the task turns the (host)
  outputs into metrics and may write images into workdir."""
  outputs = [jax.device_get(eval_step(params, global_batch(batch, setup)))
             for batch in data.eval]
  return task.summarize(outputs, data, workdir=workdir, step=step)


def global_batch(batch: dict, setup: state_lib.Setup) -> dict:
  """This process's rows -> global arrays sharded over the batch axes.

  The process holds share i of n (`batch_share`): the global batch has n
  times its rows, whatever the number of processes."""
  _, shares = batch_share(setup.mesh)
  return {k: jax.make_array_from_process_local_data(
      setup.batch_sharding(np.ndim(v)), np.asarray(v),
      (shares * np.shape(v)[0], *np.shape(v)[1:]))
          for k, v in batch.items()}


def _meter(config, task, setup, train_step, state, batch) -> perf.Meter:
  """Model FLOPs per step (analytic where the task has a count, else XLA's)
  against the devices' peak; logs both counts and where the peak is from."""
  xla = perf.xla_flops(train_step.lower(state, batch))
  analytic = task.model_flops_per_step(setup.model_cfg)
  dtype = config.precision.compute_dtype
  peak, source = perf.peak_flops(dtype, jax.devices())
  flops = analytic or xla
  log(f"FLOPs per step: {flops / 1e9:,.1f} G "
      + (f"(analytic; XLA's cost analysis: {xla / 1e9:,.1f} G, "
         f"{xla / analytic:.3f}x)" if analytic else "(XLA's cost analysis)")
      + f" | peak {peak / 1e12:,.3g} TFLOP/s ({source})")
  return perf.Meter(flops, peak)


def _lora_base(config, setup, workdir, resumed: bool):
  """A LoRA run's frozen base on the mesh: the base run's latest step on a
  fresh start (recorded in lora_base.json), the recorded step on resume
  (lm/run/checks.py has refused a base that moved on)."""
  recorded = restore.lora_base(workdir) if resumed else None
  step, frozen = restore.load_lora_base(
      config, setup, recorded["step"] if recorded else None)
  if not resumed:
    restore.write_lora_base(workdir, config.train.init_from, step)
  c = config.lora
  stored = {"none": "float", "int8": "int8", "int4": "int4"}[c.base_quant]
  log(f"LoRA rank {c.rank} (alpha {c.alpha:g}) on "
      f"{lora.adapted_layers(setup.abstract_state.params)} projections: "
      f"{state_lib.count_params(setup.abstract_state.params):,} trainable "
      f"adapter parameters | {lora.count_base(frozen):,} frozen base "
      f"parameters ({stored}, {lora.nbytes(frozen) / 2 ** 20:,.1f} MiB) "
      f"from step {step} of {config.train.init_from}")
  return frozen


def train(config, workdir: str | Path, *, stop_at_step: int | None = None,
          on_eval: Callable[[int, dict], None] | None = None) -> dict:
  """Trains (or resumes) `config` in `workdir`; returns final metrics.

  `stop_at_step` checkpoints and returns after that step, as a preemption
  would (for tests and for splitting a run into pieces). `on_eval(step,
  metrics)` is called after each logged eval (a sweep reports it to its
  trial); an exception it raises ends the run there (a pruned trial).
  """
  timer = goodput.Breakdown()  # Where the wall time goes, from here.
  config, _ = checks.validate(config)
  workdir = paths.resolve(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"the run directory {workdir} is a file; give --workdir "
                    "a directory (new or a run's).")
  checks.resume(config, workdir)
  total = config.train.steps
  mesh = make_mesh(config.mesh, dcn=config.mesh_dcn)
  task = tasks.get(config)

  with jax.set_mesh(mesh), rules_lib.use(rules_lib.Rules()), \
      _StopSignals() as signals, timer:
    # Builds the model (abstractly): bad quant/prune patterns stop here,
    # before the workdir is made or any data is read.
    setup = state_lib.make_setup(config, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
      if jax.process_index() == 0:  # One writer: the job, through process 0.
        held.enter_context(lock_lib.RunLock(workdir, log))
      data = task.make_data(*batch_share(mesh))
      plan = None  # DP-SGD: its noise and budget (lm/train/accountant.py).
      if privacy.enabled(config.privacy):
        plan = accountant.plan(config, task.privacy_examples())
        setup = dataclasses.replace(setup, privacy=privacy.from_config(
            config, plan.noise_multiplier))
        log(plan.describe(config))
      write_config(config, workdir)
      sinks = wandb_sink.sinks(config, workdir)  # W&B starts (or fails).
      ckpt = ckpt_lib.Checkpointer(
          workdir / "checkpoints", max_to_keep=config.train.max_checkpoints)
      timer.open(workdir, resumed=ckpt.latest_step() is not None)
      metrics_log = MetricsLog(workdir, total, sinks=sinks)
      profiler = profiler_lib.Window(config.train.profile_steps, workdir)
      try:
        result = _train(config, task, setup, data, ckpt, metrics_log,
                        signals, stop_at_step, workdir, timer, profiler,
                        on_eval, plan)
        profiler.close()
        with timer.phase("checkpoint"):
          ckpt.wait()  # The last save, written in the background.
        record = timer.save(result["step"])  # The attempt's last word.
        metrics_log.summary(goodput.SPLIT, record)
        log(goodput.summary(record))
        return result
      finally:
        try:
          profiler.close()
          ckpt.close()
        finally:
          metrics_log.close()


def _train(config, task, setup, data, ckpt, metrics_log, signals,
           stop_at_step, workdir, timer, profiler, on_eval=None,
           plan=None) -> dict:
  total = config.train.steps
  # A privacy budget may end the run sooner: at the last step it allows.
  last = min(total, plan.steps) if plan else total
  latest = ckpt.latest_step()
  n_params = state_lib.count_params(setup.abstract_state.params)
  hosts = (f" in {jax.process_count()} processes"
           if jax.process_count() > 1 else "")
  log(f"mesh {describe(setup.mesh)} on {jax.device_count()} "
      f"{jax.devices()[0].platform} devices{hosts} | {n_params:,} parameters")
  stages = setup.mesh.shape["stage"]
  if stages > 1:
    micro = config.train.microbatches
    log(f"pipeline: {stages} stages x {micro} microbatches, bubble "
        f"(S-1)/(M+S-1) = {pipeline.bubble_fraction(stages, micro):.3f}")
  if latest is not None:
    with timer.phase("checkpoint"):
      latest, state = ckpt.restore_latest(setup.abstract_state, data.train,
                                          quarantine=True, warn=log)
    log(f"resumed from step {latest} in {ckpt.directory}")
  elif config.train.init_from and not lora.enabled(config):
    source_step, _, params = restore.params_on(config.train.init_from,
                                               setup.mesh, config.mesh)
    state = state_lib.state_from_params(setup, config, params)
    log(f"starting from step {source_step} of {config.train.init_from} "
        "(its parameters; a fresh optimizer)")
  else:
    state = setup.init_fn(jax.random.key(config.seed))
  step = int(jax.device_get(state.step))
  if step >= last:
    log(f"already trained to step {step} (config.train.steps={total}).")
  frozen = None
  if lora.enabled(config):
    frozen = _lora_base(config, setup, workdir, resumed=latest is not None)
  teacher = None
  if distill.enabled(config):
    teacher = restore.load_teacher(config, setup.mesh)
    log(f"distilling from {config.distill.teacher_workdir} (step "
        f"{teacher.step})")
  train_step = step_lib.jit_train_step(
      setup, task, config.train.grad_accum_steps, teacher, frozen)
  eval_step = None
  if config.train.eval_every:
    eval_step = step_lib.jit_eval_step(setup, task, task.prepare_eval(),
                                       frozen)
  unit, units_per_step = task.throughput()
  meter = None  # lm/run/perf.py; made at the first step, from its batch.
  pending = collections.deque()  # (step, metrics) not yet read on the host.
  window = []  # Train metrics since the last log line.
  last_log_time, last_log_step = time.time(), step
  last_saved = latest
  result = {}

  skipped_before = (0.0 if state.loss_scale is None
                    else float(jax.device_get(state.loss_scale.skipped_steps)))

  def drain(keep: int):
    nonlocal last_log_time, last_log_step, skipped_before
    while len(pending) > keep:
      s, m = pending.popleft()
      with timer.phase("step"):  # The host waits here for step s to end.
        m = jax.device_get(m)
      m = {k: float(v) for k, v in m.items()}
      # float16: a step skipped for non-finite gradients changed nothing
      # and is counted in skipped_steps; it is not an error.
      skipped = m.get("skipped_steps", 0) > skipped_before
      skipped_before = m.get("skipped_steps", 0)
      if not math.isfinite(m["loss"]) and not skipped:
        raise NonFiniteLossError(
            f"The training loss became {m['loss']} at step {s}. The last good "
            f"checkpoint is step {last_saved} in {ckpt.directory}. Lower "
            "config.optimizer.learning_rate, set "
            "config.optimizer.grad_clip_norm, or use float32.")
      if math.isfinite(m["loss"]):
        window.append(m)
      if window and (s % config.train.log_every == 0 or s == last):
        now = time.time()
        mean = {k: float(np.mean([w[k] for w in window])) for k in m}
        for latest in ("learning_rate", "loss_scale", "skipped_steps"):
          if latest in m:
            mean[latest] = m[latest]
        mean[f"{unit}_per_sec"] = (units_per_step * (s - last_log_step)
                                   / max(now - last_log_time, 1e-9))
        mean.update(meter.metrics(s - last_log_step, now - last_log_time))
        metrics_log.write(s, "train", mean)
        metrics_log.write(s, goodput.SPLIT, timer.save(s))
        metrics_log.progress(s, mean)
        result["train"] = mean
        window.clear()
        last_log_time, last_log_step = now, s

  while step < last:
    with profiler.step(step):  # A marked step in a profile: input, dispatch.
      with timer.phase("data"):
        batch = global_batch(next(data.train), setup)
      if meter is None:
        meter = _meter(config, task, setup, train_step, state, batch)
      with timer.phase("step"):
        state, metrics = train_step(state, batch)
    step += 1
    ckpt.check_saved()  # A failed async save stops the run here.
    pending.append((step, metrics))
    # At the profile window's end, the trace waits for its steps to finish.
    drain(keep=0 if profiler.ends_at(step) else MAX_IN_FLIGHT)
    profiler.after(step)
    if config.train.eval_every and (step % config.train.eval_every == 0
                                    or step == last):
      drain(keep=0)
      with timer.phase("eval"):
        result["eval"] = evaluate(task, eval_step, state.params, data, setup,
                                  workdir=workdir, step=step)
      metrics_log.images(step)  # What the eval drew, to TensorBoard & W&B.
      if config.prune.sparsity:  # Achieved, read from the parameters.
        layers = tuple(config.prune.layers)
        by_layer = prune.layer_sparsity(state.params, layers)
        result["eval"]["sparsity"] = prune.overall_sparsity(state.params,
                                                            layers)
        metrics_log.write(step, "sparsity", {
            "overall": result["eval"]["sparsity"], **by_layer})
      if plan:  # Spent so far, at config.privacy.delta.
        result["eval"]["epsilon"] = plan.epsilon(step)
      metrics_log.write(step, "eval", result["eval"])
      metrics_log.progress(step, result["eval"], split="eval")
      if on_eval is not None:
        on_eval(step, result["eval"])
    # After the eval: a signal during a long eval saves this step.
    stopping = signals.stop(step) or step == stop_at_step
    every = config.train.checkpoint_every
    if (every and step % every == 0) or step == last or stopping:
      drain(keep=0)  # Never checkpoint a state whose loss was not checked.
      with timer.phase("checkpoint"):
        ckpt.save(step, state, data.train, force=True)
      last_saved = step
    if stopping:
      log(f"stopped at step {step}; rerun the same command to resume.")
      break
  drain(keep=0)
  if last < total and step == last:
    log(accountant.describe_stop(plan, config))
  result["step"] = step
  result["params"] = state.params
  return result
