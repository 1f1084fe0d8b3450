"""Real int8 serving models: conversion and their sharded abstract form.

`convert` turns float32 parameters (from a QAT run or a plain float run, the
latter being post-training quantization) into int8 weights plus float32
per-output-channel scales for the layers `config.quant.layers` names, with
qwix's PTQ provider; the other parameters (embedding, norms, head) stay
float32. The serving model runs int8 x int8 matmuls when activations are
quantized (dynamic per-token scales), as QAT's forward pass did.

A serving directory (scripts/quantize.py --out=OUT) holds:
  OUT/config.json     the source run's config plus `serving` (what was done)
  OUT/checkpoints/    orbax checkpoint of {"step", "params"} (int8 + scales)
lm/run/restore.py loads one back.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import qwix
from flax import nnx, traverse_util

from lm import models
from lm.checks import UsageError
from lm.parallel import rules as rules_lib
from lm.quant import qat

ACTIVATIONS = ("auto", "int8", "float")


def serving_config(config, activations: str = "auto"
                   ) -> ml_collections.ConfigDict:
  """The source config plus `serving`: int8 weights, and int8 activations
  unless the source trained float activations (QAT int4_weights with
  activations=float) or `activations` says otherwise."""
  if activations not in ACTIVATIONS:
    raise UsageError(f"--activations={activations!r}; use one of "
                     f"{ACTIVATIONS}.")
  source_mode = config.quant.mode
  if activations == "auto":
    _, acts = (qat.dtypes(config.quant) if source_mode != "none"
               else (None, jnp.int8))
    activations = "float" if acts is None else "int8"
  out = ml_collections.ConfigDict(config.to_dict())
  out.serving = dict(weights="int8", activations=activations,
                     source_mode=source_mode)
  return out


def _rules(config) -> list:
  acts = qat.ACTIVATIONS[config.serving.activations]
  return [qwix.QuantizationRule(
      module_path=p, weight_qtype=jnp.int8, act_qtype=acts,
      weight_calibration_method=qat.calibration(jnp.int8),
      act_calibration_method=qat.calibration(acts))
          for p in config.quant.layers]


def abstract_model(config) -> nnx.Module:
  """The serving model, abstract: int8 kernels (as qwix WithAux) where the
  rules match."""
  provider = qwix.PtqProvider(_rules(config))
  return models.abstract_model(
      models.model_config(float_config(config)), config.model.name,
      lambda model, x: qat.quantize_with(provider, model, x))


def float_config(config) -> ml_collections.ConfigDict:
  """`config` with QAT off: the serving model is built from the float one."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.quant.mode = "none"
  return out


def param_shardings(config, mesh, abstract_params):
  """Each int8 kernel and its scales follow the float kernel's logical axes
  (a dimension of size 1 in the scales is replicated)."""
  _, logical = models.logical_specs(models.abstract_model(
      models.model_config(float_config(config)), config.model.name))
  flat_logical = traverse_util.flatten_dict(logical)

  def sharding(path, leaf):
    key = tuple(k.key for k in path)
    while key not in flat_logical:  # .../kernel/array/qvalue -> .../kernel
      key = key[:-1]
    return rules_lib.param_sharding(mesh, flat_logical[key], leaf.shape)

  return jax.tree_util.tree_map_with_path(sharding, abstract_params)


def convert(float_params, config):
  """float32 parameters -> the serving parameter tree (int8 + scales)."""
  return qwix.quantize_params(float_params, abstract_model(config))


def params_bytes(params) -> int:
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(params))


def dtype_bytes(params) -> dict[str, int]:
  """Bytes per dtype, e.g. {"int8": ..., "float32": ...}."""
  out: dict[str, int] = {}
  for x in jax.tree.leaves(params):
    name = jnp.dtype(x.dtype).name
    out[name] = out.get(name, 0) + int(x.size) * jnp.dtype(x.dtype).itemsize
  return out


@dataclasses.dataclass(frozen=True)
class Serving:
  graphdef: nnx.GraphDef
  abstract_params: object  # ShapeDtypeStructs with shardings.


def setup_for(config, mesh) -> Serving:
  """The serving model's graph and abstract parameters, sharded on `mesh`
  through the current rules table."""
  graphdef, state = nnx.split(abstract_model(config))
  abstract = nnx.to_pure_dict(state)
  shardings = param_shardings(config, mesh, abstract)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)
  return Serving(graphdef=graphdef, abstract_params=abstract)


def checkpoint_item(params, step: int = 0) -> dict:
  """What a serving checkpoint holds (abstract or concrete)."""
  step_ = (jax.ShapeDtypeStruct((), jnp.int32)
           if isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
           else jnp.asarray(step, jnp.int32))
  return {"step": step_, "params": params}
