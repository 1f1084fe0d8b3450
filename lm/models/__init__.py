"""The explicit registry of model families: the trainer never names a class.

Each entry is a module with a frozen `Config` dataclass and `make(cfg, rngs)`.
"""
from __future__ import annotations

import dataclasses
import types

from lm.models import transformer

MODELS: dict[str, types.ModuleType] = {
    "transformer": transformer,
}


def model_config(config) -> object:
  """Builds the model's frozen Config from `config.model` + `config.precision`."""
  family = MODELS[config.model.name]
  fields = {f.name for f in dataclasses.fields(family.Config)}
  kwargs = {k: v for k, v in config.model.items() if k != "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
        f"config.model.{unknown[0]} is not a field of the {config.model.name!r}"
        f" model; known fields: {sorted(fields - {'dtype', 'param_dtype'})}.")
  return family.Config(**kwargs, dtype=config.precision.compute_dtype,
                       param_dtype=config.precision.param_dtype)
