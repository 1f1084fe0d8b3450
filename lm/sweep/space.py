"""A sweep's search space: the config keys it varies and their values.

`sweep.space` mirrors the config: `space.optimizer.learning_rate =
dict(low=1e-4, high=1e-2, log=True)` searches config.optimizer.learning_rate.
Each searched key holds one of

  dict(choices=(a, b, ...))                 any of these values
  dict(low=L, high=H, log=False, step=0)    a range; integers or floats as the
                                            config key is (its default's type)
  dict(low=L, high=H, points=N, log=False)  grid only: N values from L to H,
                                            evenly spaced (geometric if log)

A grid tries every combination, so its ranges need explicit values: `points`
or `step` (L, L + step, ... up to H). Random and Bayesian methods sample a
range continuously, or on the `step` lattice. Optuna's parameter names are
the dotted config keys ("optimizer.learning_rate").
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import optuna

from lm import checks

ConfigError = checks.ConfigError
# The keys a searched key's dict may hold.
FIELDS = ("choices", "low", "high", "log", "step", "points")
# Values Optuna's storage holds as they are.
PLAIN = (str, int, float, bool, type(None))


@dataclasses.dataclass(frozen=True)
class Param:
  key: str  # Dotted config key, e.g. "optimizer.learning_rate".
  kind: str  # categorical | int | float
  choices: tuple = ()
  low: float = 0.0
  high: float = 0.0
  log: bool = False
  step: float = 0.0  # 0 = continuous.
  points: int = 0  # Grid only: values from low to high.

  def grid(self) -> list:
    """The values a grid tries."""
    if self.kind == "categorical":
      return list(self.choices)
    if self.points:
      make = np.geomspace if self.log else np.linspace
      values = make(self.low, self.high, self.points)
    else:  # A step: low, low + step, ... up to high (rounding forgiven).
      count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
      values = self.low + self.step * np.arange(count)
    if self.kind == "int":
      return sorted({int(round(v)) for v in values})
    return [float(v) for v in values]

  def distribution(self, method: str) -> optuna.distributions.BaseDistribution:
    """What Optuna samples: a grid's values are a categorical choice."""
    if self.kind == "categorical" or method == "grid":
      return optuna.distributions.CategoricalDistribution(self.grid())
    if self.kind == "int":
      return optuna.distributions.IntDistribution(
          int(self.low), int(self.high), log=self.log,
          step=int(self.step) or 1)
    return optuna.distributions.FloatDistribution(
        self.low, self.high, log=self.log, step=self.step or None)


def parse(space, config, method: str) -> list[Param]:
  """The searched keys of `space` (sweep.space) against the experiment's
  resolved `config`; raises ConfigError naming the sweep key and the fix."""
  space = _plain(space)
  checks.require(bool(space), "sweep.space is empty; name the config keys "
                 "to search, e.g. sweep.space.optimizer.learning_rate = "
                 "dict(low=1e-4, high=1e-2, log=True).")
  config, out = _plain(config), []
  _walk(space, config, "", method, out, _leaves(config))
  return out


def apply(config, values: dict[str, Any]):
  """A copy of `config` with each dotted key set to its value."""
  config = config.copy_and_resolve_references()
  for key, value in values.items():
    *sections, leaf = key.split(".")
    node = config
    for s in sections:
      node = node[s]
    node[leaf] = value
  return config


def _plain(node) -> Any:
  """ConfigDicts (and their FrozenConfigDicts) as dicts."""
  if hasattr(node, "to_dict"):
    return node.to_dict()
  return node


def _leaves(config: dict, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    out += (_leaves(value, f"{prefix}{key}.") if isinstance(value, dict)
            else [f"{prefix}{key}"])
  return out


def _walk(space: dict, config: dict, prefix: str, method: str,
          out: list[Param], keys: list[str]) -> None:
  """Appends the searched keys under `prefix` to `out`; `keys` are every
  dotted key of the config (for the nearest one to a misspelled key)."""
  for name, node in space.items():
    key = f"{prefix}{name}"
    where = f"sweep.space.{key}"
    if name not in config:
      near = checks.nearest(key, keys)
      raise ConfigError(
          f"{where}: config.{key} is not a key of the config"
          + (f"; did you mean {near}? (sweep.space.{near})" if near else
             f"; its keys are in lm/config.py."))
    checks.require(isinstance(node, dict), f"{where}={node!r}: give the "
                   "values to try, dict(choices=(...)) or dict(low=..., "
                   "high=...).")
    if isinstance(config[name], dict):
      checks.require(
          not set(node) & set(FIELDS) or set(node) <= set(config[name]),
          f"{where}: config.{key} is a section; search its keys, e.g. "
          f"sweep.space.{key}.{next(iter(config[name]), 'x')}.")
      _walk(node, config[name], f"{key}.", method, out, keys)
    else:
      out.append(_param(key, node, config[name], method))


def _param(key: str, spec: dict, default, method: str) -> Param:
  where = f"sweep.space.{key}"
  for field in spec:
    if field not in FIELDS:
      near = checks.nearest(field, FIELDS)
      raise ConfigError(f"{where}.{field} is unknown" + (
          f"; did you mean {where}.{near}?" if near
          else f"; use {', '.join(FIELDS)}."))
  if "choices" in spec:
    return _choices(key, spec, default)
  checks.require("low" in spec and "high" in spec, f"{where}: give "
                 "choices=(...) or a range, low=... and high=....")
  low, high = spec["low"], spec["high"]
  kind = ("int" if isinstance(default, int) and not isinstance(default, bool)
          else "float" if isinstance(default, float) else None)
  checks.require(kind is not None, f"{where}: config.{key} is "
                 f"{type(default).__name__} ({default!r}), not a number; "
                 "give its values as choices=(...).")
  for field in ("low", "high"):
    value = spec[field]
    checks.require(
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value)
        and (kind == "float" or float(value).is_integer()),
        f"{where}.{field}={value!r}: config.{key} is {kind}; give "
        f"{'an integer' if kind == 'int' else 'a number'}.")
  checks.require(low != high, f"{where}: the range low={low} high={high} is "
                 "empty; give high > low (or choices=(...) for one value).")
  checks.require(low < high, f"{where}: the range low={low} high={high} is "
                 f"inverted; swap them (low={high}, high={low}).")
  log = bool(spec.get("log", False))
  checks.require(not log or low > 0, f"{where}: log=True needs low > 0 "
                 f"(low={low}).")
  step = spec.get("step") or 0
  points = spec.get("points") or 0
  checks.require(step >= 0 and (kind == "float" or float(step).is_integer()),
                 f"{where}.step={step!r}: give a positive "
                 f"{'integer' if kind == 'int' else 'number'}.")
  checks.require(not (step and step > high - low), f"{where}.step={step} is "
                 f"wider than the range ({low} to {high}); lower it.")
  checks.require(not (step and log and method != "grid"), f"{where}: Optuna "
                 "samples a log range without a step; drop step or log.")
  if method == "grid":
    checks.require(bool(step) != bool(points), f"{where}: a grid needs its "
                   "values: points=N (N values from low to high, geometric "
                   "if log=True) or step=S, not both; or choices=(...).")
    checks.require(not points or (isinstance(points, int) and points >= 2),
                   f"{where}.points={points!r}: give an integer >= 2.")
  else:
    checks.require(not points, f"{where}.points is for sweep.method=grid; "
                   "sample the range (drop points) or give step=S.")
  return Param(key, kind, low=low, high=high, log=log, step=step,
               points=points)


def _choices(key: str, spec: dict, default) -> Param:
  where = f"sweep.space.{key}"
  extra = sorted(set(spec) - {"choices"})
  checks.require(not extra, f"{where}: choices=(...) takes no "
                 f"{', '.join(extra)}; drop them.")
  choices = spec["choices"]
  checks.require(isinstance(choices, (list, tuple)) and len(choices) > 0,
                 f"{where}.choices={choices!r} is empty; give the values to "
                 "try, e.g. choices=(0.0, 0.1).")
  checks.require(len(set(map(repr, choices))) == len(choices),
                 f"{where}.choices={tuple(choices)!r} repeats a value; list "
                 "each once.")
  for value in choices:
    checks.require(isinstance(value, PLAIN), f"{where}.choices holds "
                   f"{value!r}; a study stores only strings, numbers, "
                   "booleans and None.")
    fits = (type(value) is type(default)
            or (isinstance(default, float) and type(value) is int)
            or default is None)
    checks.require(fits, f"{where}.choices holds {value!r} "
                   f"({type(value).__name__}), but config.{key} is "
                   f"{type(default).__name__} ({default!r}).")
  if isinstance(default, float):  # 0 and 1 mean 0.0 and 1.0 here.
    choices = [float(v) if type(v) is int else v for v in choices]
  return Param(key, "categorical", choices=tuple(choices))


def suggest(trial: optuna.Trial, param: Param, method: str) -> Any:
  """The trial's value for `param` (a retry's is its original's)."""
  d = param.distribution(method)
  if isinstance(d, optuna.distributions.CategoricalDistribution):
    return trial.suggest_categorical(param.key, d.choices)
  if isinstance(d, optuna.distributions.IntDistribution):
    return trial.suggest_int(param.key, d.low, d.high, step=d.step, log=d.log)
  return trial.suggest_float(param.key, d.low, d.high, step=d.step, log=d.log)
