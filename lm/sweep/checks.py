"""A sweep config checked against the experiment's config, before any
trial is created or anything compiles: every message names the sweep key
(or config key) and the fix."""
from __future__ import annotations

import importlib.util

import ml_collections

from lm import checks
from lm.run import checks as run_checks
from lm.sweep import space as space_lib, spec
from lm.tasks import TASKS

ConfigError = checks.ConfigError


def check(sweep, config) -> tuple[ml_collections.ConfigDict,
                                  ml_collections.ConfigDict,
                                  list[space_lib.Param]]:
  """(the resolved sweep, the validated experiment config, the searched
  keys). Every trial's config is the experiment's with the searched keys
  set; each key's extreme values are validated here, so a trial does not
  fail on a value the space allows."""
  sweep = spec.resolve(sweep)
  config, _ = run_checks.validate(config)
  checks.one_of(sweep.method, spec.METHODS, "sweep.method")
  if sweep.method == "gp":
    checks.require(importlib.util.find_spec("torch") is not None,
                   "sweep.method=gp: Optuna's GPSampler needs torch, which "
                   "is not installed (nor in requirements.txt); pip install "
                   "torch --index-url https://download.pytorch.org/whl/cpu, "
                   "or use sweep.method=tpe.")
  params = space_lib.parse(sweep.space, config, sweep.method)
  checks.require(isinstance(sweep.startup_trials, int)
                 and sweep.startup_trials >= 1, f"sweep.startup_trials="
                 f"{sweep.startup_trials!r}: give an integer >= 1.")
  _objective(sweep.objective, config)
  _budget(sweep, params)
  _pruner(sweep.pruner, config)
  checks.require(isinstance(sweep.heartbeat_s, int) and sweep.heartbeat_s > 0,
                 f"sweep.heartbeat_s={sweep.heartbeat_s!r}: give a positive "
                 "integer (seconds).")
  checks.require(
      isinstance(sweep.stale_after_s, int)
      and sweep.stale_after_s > sweep.heartbeat_s,
      f"sweep.stale_after_s={sweep.stale_after_s!r}: give an integer above "
      f"sweep.heartbeat_s={sweep.heartbeat_s} (seconds; a few heartbeats).")
  for param in params:  # The space's corners are valid configs.
    for value in {str(v): v for v in _extremes(param)}.values():
      try:
        run_checks.validate(space_lib.apply(config, {param.key: value}))
      except ConfigError as e:
        raise ConfigError(f"sweep.space.{param.key}: the value {value!r} "
                          f"makes an invalid config: {e}") from e
  return sweep, config, params


def _extremes(param: space_lib.Param) -> list:
  if param.kind == "categorical":
    return list(param.choices)
  cast = int if param.kind == "int" else float
  return [cast(param.low), cast(param.high)]


def _objective(objective, config) -> None:
  task = TASKS[config.task]
  metrics = list(task.EVAL_METRICS) + (["sparsity"] if config.prune.sparsity
                                       else [])
  if objective.metric not in metrics:
    near = checks.nearest(objective.metric, metrics) or next(
        (m for m in metrics if m.startswith(objective.metric)), None)
    raise ConfigError(
        f"sweep.objective.metric={objective.metric!r}: task {task.name} "
        "does not log it in its evals; "
        + (f"did you mean {near!r}? " if near else "")
        + f"its eval metrics: {', '.join(metrics)}.")
  checks.one_of(objective.direction, ("minimize", "maximize"),
                "sweep.objective.direction")
  checks.require(config.train.eval_every > 0, "config.train.eval_every=0: "
                 "a sweep's objective is an eval metric; set "
                 "config.train.eval_every (the last step always evals).")


def _budget(sweep, params: list[space_lib.Param]) -> None:
  trials = sweep.budget.trials
  checks.require(isinstance(trials, int) and trials >= 0,
                 f"sweep.budget.trials={trials!r}: give a count (0 = the "
                 "whole grid, for sweep.method=grid).")
  checks.require(trials > 0 or sweep.method == "grid",
                 f"sweep.budget.trials=0: sweep.method={sweep.method} needs "
                 "a number of trials, e.g. sweep.budget.trials=20.")
  checks.require(sweep.budget.minutes >= 0, f"sweep.budget.minutes="
                 f"{sweep.budget.minutes}: give 0 (no limit) or more.")
  if sweep.method == "grid":
    size = spec.grid_size(params)
    checks.require(trials <= size, f"sweep.budget.trials={trials}: the grid "
                   f"has {size} points; give at most that (0 = all).")


def _pruner(pruner, config) -> None:
  checks.one_of(pruner.name, spec.PRUNERS, "sweep.pruner.name")
  if pruner.name == "none":
    return
  checks.require(
      config.train.eval_every < config.train.steps,
      f"sweep.pruner.name={pruner.name} prunes on intermediate evals, but "
      f"config.train.eval_every={config.train.eval_every} evaluates only at "
      f"the last step (config.train.steps={config.train.steps}); lower "
      "eval_every, or set sweep.pruner.name=none.")
  for key in ("startup_trials", "warmup_steps", "min_resource"):
    value = pruner[key]
    checks.require(isinstance(value, int) and value >= 0,
                   f"sweep.pruner.{key}={value!r}: give an integer >= 0.")
  checks.require(pruner.reduction_factor >= 2, f"sweep.pruner."
                 f"reduction_factor={pruner.reduction_factor}: give >= 2.")
