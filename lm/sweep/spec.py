"""The sweep config: every key with its default, and its checks.

A sweep file (configs/sweeps/*.py) is a `get_config()` that starts from
`base()` and sets the search space, the objective, the budget and the
method; `--sweep.x=y` overrides any key. `check` validates it against the
experiment's config before any trial is created or anything compiles, and
every message names the sweep key (or config key) and the fix.
"""
from __future__ import annotations

import copy
import importlib.util

import ml_collections

from lm import checks
from lm.run import checks as run_checks
from lm.sweep import space as space_lib
from lm.tasks import TASKS

ConfigError = checks.ConfigError
METHODS = ("grid", "random", "tpe", "gp")
PRUNERS = ("none", "median", "halving")


def base() -> ml_collections.ConfigDict:
  """Every sweep key, at its default."""
  s = ml_collections.ConfigDict()
  # grid: every combination | random | tpe: Bayesian (Optuna's default) |
  # gp: Bayesian with a Gaussian process (needs torch, not in
  # requirements.txt: pip install torch --index-url
  # https://download.pytorch.org/whl/cpu).
  s.method = "tpe"
  s.seed = 0  # The sampler's: one worker with one seed repeats its trials.
  # Config keys and their values (lm/sweep/space.py), mirroring the config:
  # space.optimizer.learning_rate = dict(low=1e-4, high=1e-2, log=True).
  s.space = ml_collections.ConfigDict()
  # The objective: an eval metric of the task (its last eval in a trial).
  s.objective = dict(metric="loss", direction="minimize")  # | maximize.
  s.budget = dict(
      trials=0,  # Trials in the study, all workers together; 0 = the grid.
      minutes=0.0)  # A worker starts no trial after this; 0 = no limit.
  # Stopping bad trials from their intermediate evals (every
  # config.train.eval_every steps): median (below the median of the other
  # trials at the same step) | halving (asynchronous successive halving) |
  # none.
  s.pruner = dict(
      name="median",
      startup_trials=5,  # median: finished trials before any pruning.
      warmup_steps=0,  # median: no pruning before this training step.
      min_resource=0,  # halving: steps of the first rung; 0 = Optuna's auto.
      reduction_factor=3)  # halving: 1 / the fraction promoted per rung.
  # "" = sqlite:///WORKDIR/study.db; a postgresql://USER:PASSWORD@HOST/DB
  # URL lets workers on several machines share the study (WORKSPACE.md).
  s.storage = ""
  s.study_name = ""  # "" = the name of --workdir.
  # A running trial's worker records a heartbeat every heartbeat_s; a trial
  # without one for stale_after_s is taken to be dead (its worker killed)
  # and is run again, continuing from its checkpoint.
  s.heartbeat_s = 10
  s.stale_after_s = 60
  return s


def resolve(sweep) -> ml_collections.ConfigDict:
  """`base()` with the values of `sweep` on top; a key the base does not
  have is a ConfigError naming the nearest one."""
  values = (sweep.to_dict() if isinstance(sweep, ml_collections.ConfigDict)
            else copy.deepcopy(dict(sweep)))
  out = base().to_dict()
  space = values.pop("space", {})
  _merge(out, values, "sweep")
  out["space"] = space
  return ml_collections.ConfigDict(out)


def _merge(into: dict, values: dict, where: str) -> None:
  for key, value in values.items():
    if key not in into:
      near = checks.nearest(key, into)
      raise ConfigError(f"{where}.{key} is unknown" + (
          f"; did you mean {where}.{near}?" if near
          else f"; the keys of {where} are {sorted(into)}."))
    if isinstance(into[key], dict):
      checks.require(isinstance(value, dict), f"{where}.{key} is a section "
                     f"({sorted(into[key])}); set its keys.")
      _merge(into[key], value, f"{where}.{key}")
    else:
      into[key] = value


def check(sweep, config) -> tuple[ml_collections.ConfigDict,
                                  ml_collections.ConfigDict,
                                  list[space_lib.Param]]:
  """(the resolved sweep, the validated experiment config, the searched
  keys). Every trial's config is the experiment's with the searched keys
  set; each key's extreme values are validated here, so a trial does not
  fail on a value the space allows."""
  sweep = resolve(sweep)
  config, _ = run_checks.validate(config)
  checks.one_of(sweep.method, METHODS, "sweep.method")
  if sweep.method == "gp":
    checks.require(importlib.util.find_spec("torch") is not None,
                   "sweep.method=gp: Optuna's GPSampler needs torch, which "
                   "is not installed (nor in requirements.txt); pip install "
                   "torch --index-url https://download.pytorch.org/whl/cpu, "
                   "or use sweep.method=tpe.")
  params = space_lib.parse(sweep.space, config, sweep.method)
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
    near = checks.nearest(objective.metric, metrics)
    raise ConfigError(
        f"sweep.objective.metric={objective.metric!r}: task {task.name} "
        f"does not log it in its evals"
        + (f"; did you mean {near!r}?" if near else "")
        + f" Its eval metrics: {', '.join(metrics)}.")
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
    size = grid_size(params)
    checks.require(trials <= size, f"sweep.budget.trials={trials}: the grid "
                   f"has {size} points; give at most that (0 = all).")


def grid_size(params: list[space_lib.Param]) -> int:
  size = 1
  for p in params:
    size *= len(p.grid())
  return size


def _pruner(pruner, config) -> None:
  checks.one_of(pruner.name, PRUNERS, "sweep.pruner.name")
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
