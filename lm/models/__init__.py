"""The explicit registry of model families: the trainer never names a class.

Each entry is a module with a frozen `Config` dataclass and `make(cfg, rngs)`;
a family trained by several optimizers (the GAN) lists its parameter groups
in `OPTIMIZER_GROUPS`.
"""
from __future__ import annotations

import dataclasses
import types

from lm.models import gan, mlp, transformer, transformer_classifier

MODELS: dict[str, types.ModuleType] = {
    "transformer": transformer,
    "transformer_classifier": transformer_classifier,
    "mlp": mlp,
    "gan": gan,
}


def model_config(config) -> object:
  """Builds the model's frozen Config from `config.model` + `config.precision`."""
  family = MODELS[config.model.name]
  fields = {f.name for f in dataclasses.fields(family.Config)}
  # Lists (from JSON or the command line) become tuples: the config is part
  # of the model's static graph, which must be hashable.
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in config.model.items() if k != "name"}
  derived = {"dtype", "param_dtype", "pipeline_microbatches"}
  unknown = sorted(set(kwargs) - (fields - derived))
  if unknown:
    raise ValueError(
        f"config.model.{unknown[0]} is not a field of the {config.model.name!r}"
        f" model; known fields: {sorted(fields - derived)}.")
  defaults = family.Config()
  for key, value in kwargs.items():
    # A nested section (config.model.moe) becomes its frozen dataclass.
    default = getattr(defaults, key)
    if dataclasses.is_dataclass(default) and not dataclasses.is_dataclass(
        value):
      kwargs[key] = _nested(default, dict(value), f"config.model.{key}")
  if "pipeline_microbatches" in fields:
    kwargs["pipeline_microbatches"] = config.train.get("microbatches", 1)
  quantized = (config.get("quant", {}).get("mode", "none") != "none"
               or "serving" in config)
  if "einsum_grad" in fields and quantized:
    # qwix intercepts jnp.einsum (QAT and int8 serving) and defines its
    # gradient; a custom VJP around it would bypass that.
    kwargs["einsum_grad"] = "autodiff"
  return family.Config(**kwargs, dtype=config.precision.compute_dtype,
                       param_dtype=config.precision.param_dtype)


def _nested(default, values: dict, key: str):
  fields = {f.name for f in dataclasses.fields(default)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"{key}.{unknown[0]} is unknown; known fields: "
                     f"{sorted(fields)}.")
  return dataclasses.replace(default, **values)
