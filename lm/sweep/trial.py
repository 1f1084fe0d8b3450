"""One trial of a sweep: the experiment's config with the trial's values,
trained as an ordinary run in WORKDIR/trial_SLOT by the run layer's loop.

Each eval reports the objective metric to the trial (the step is the
training step); when the pruner says so the run stops there. The trial's
value is the objective metric of the last eval (the loop always evaluates
at the last step). A run directory that already holds a checkpoint (a
retried trial) continues from it: the loop's own resume.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import optuna

from lm import paths
from lm.run import loop
from lm.sweep import space as space_lib, study as study_lib


class TrialInterrupted(Exception):
  """The run stopped before its last step (SIGTERM or Ctrl-C: it saved a
  checkpoint); the trial runs again when the sweep is rerun."""


def run_dir(workdir, slot: int) -> Path:
  return paths.resolve(workdir) / f"trial_{slot}"


def objective(config, sweep, params: list[space_lib.Param], workdir,
              log: Callable[[str], None] = print) -> study_lib.Objective:
  """`objective(trial, slot) -> value` for lm.sweep.study.work."""
  metric = sweep.objective.metric

  def run(trial: optuna.Trial, slot: int) -> float:
    values = {p.key: space_lib.suggest(trial, p, sweep.method) for p in params}
    trial_config = space_lib.apply(config, values)
    directory = run_dir(workdir, slot)
    trial.set_user_attr("run_dir", str(directory))
    again = "" if slot == trial.number else f" (trial {slot} again)"
    log(f"trial {trial.number}{again}: {directory} | " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in values.items()))

    def on_eval(step: int, metrics: dict) -> None:
      value = metrics[metric]
      trial.report(value, step)
      if trial.should_prune():
        raise optuna.TrialPruned(f"{metric} {value:.4g} at step {step}")

    try:
      result = loop.train(trial_config, directory, on_eval=on_eval)
    except loop.NonFiniteLossError as e:  # Diverged: this trial's outcome.
      raise study_lib.TrialError(str(e)) from e
    steps = trial_config.train.steps
    if result["step"] < steps:
      raise TrialInterrupted(
          f"trial {trial.number} stopped at step {result['step']} of {steps}")
    value = (result["eval"][metric] if "eval" in result
             else last_eval(directory, steps)[metric])
    if not math.isfinite(value):
      raise study_lib.TrialError(f"{metric} is {value} at step {steps}")
    return value

  return run


def last_eval(directory: Path, step: int) -> dict:
  """The eval line of `step` in a run's metrics.jsonl (a run that had
  finished when its trial was retried)."""
  lines = [json.loads(line) for line in
           (directory / "metrics.jsonl").read_text().splitlines() if line]
  return next(m for m in reversed(lines)
              if m["split"] == "eval" and m["step"] == step)
