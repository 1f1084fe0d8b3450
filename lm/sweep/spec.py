"""The sweep config: every key with its default, and its checks.

A sweep file (configs/sweeps/*.py) is a `get_config()` that starts from
`base()` and sets the search space, the objective, the budget and the
method; `--sweep.x=y` overrides any key. lm/sweep/checks.py validates it
against the experiment's config. Light to import (no JAX): a worker of a
study needs only this, space.py and study.py.
"""
from __future__ import annotations

import copy

import ml_collections

from lm import checks
from lm.sweep import space as space_lib

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
  # tpe and gp: random trials before they model the results (Optuna's 10).
  s.startup_trials = 10
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
  # "" = sqlite:///WORKDIR/study.db; a postgresql+psycopg://USER:PASSWORD@
  # HOST/DB URL lets workers on several machines share the study
  # (WORKSPACE.md; pip install "psycopg[binary]").
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


def grid_size(params: list[space_lib.Param]) -> int:
  size = 1
  for p in params:
    size *= len(p.grid())
  return size
