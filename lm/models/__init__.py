"""The explicit registry of model families: the trainer never names a class.

Each entry is a module with a frozen `Config` dataclass (its fields and their
defaults are the `config.model` keys of that family), `make(cfg, rngs)`,
`example_input(cfg)`, `check(cfg, mesh)` (its own shape and option checks)
and `OPTIMIZER_GROUPS`: () for one optimizer over all parameters, or the
top-level parameter groups that each get their own (the GAN's two networks).
"""
from __future__ import annotations

import dataclasses
import types

import jax
from flax import nnx

from lm import backend, cpu
from lm.models import gan, mlp, transformer, transformer_classifier

MODELS: dict[str, types.ModuleType] = {
    "transformer": transformer,
    "transformer_classifier": transformer_classifier,
    "mlp": mlp,
    "gan": gan,
}

# Config fields filled from other config sections, not set in config.model:
# the compute, parameter and matmul dtypes (config.precision) and the
# pipeline's microbatches (config.train.microbatches).
DERIVED = ("dtype", "param_dtype", "pipeline_microbatches", "dot_dtype")


def defaults(name: str) -> dict:
  """`config.model` of family `name` with every field at its default (a
  nested dataclass, e.g. the transformer's `moe`, as a dict)."""
  def as_config(value):
    if dataclasses.is_dataclass(value):
      return {k: as_config(v) for k, v in dataclasses.asdict(value).items()}
    return value
  fields = {f.name: as_config(getattr(MODELS[name].Config(), f.name))
            for f in dataclasses.fields(MODELS[name].Config)
            if f.name not in DERIVED}
  return {"name": name, **fields}


def model_config(config) -> object:
  """The family's frozen Config from a resolved config (lm/config.py):
  `config.model` plus the derived fields."""
  family = MODELS[config.model.name]
  fields = {f.name: f for f in dataclasses.fields(family.Config)}
  defaults_ = family.Config()
  kwargs = {}
  for key, value in config.model.items():
    if key == "name":
      continue
    default = getattr(defaults_, key)
    if dataclasses.is_dataclass(default):  # A nested section: config.model.moe.
      value = dataclasses.replace(default, **dict(value))
    # Lists (from JSON or the command line) become tuples: the config is
    # part of the model's static graph, which must be hashable.
    kwargs[key] = tuple(value) if isinstance(value, list) else value
  if "pipeline_microbatches" in fields:
    kwargs["pipeline_microbatches"] = config.train.microbatches
  quantized = config.quant.mode != "none" or "serving" in config
  if "einsum_grad" in fields and quantized:
    # qwix intercepts jnp.einsum (QAT and int8 serving) and defines its
    # gradient; a custom VJP around it would bypass that.
    kwargs["einsum_grad"] = "autodiff"
  if "dot_dtype" in fields:
    kwargs["dot_dtype"] = dot_dtype(config.precision)
  return family.Config(**kwargs, dtype=config.precision.compute_dtype,
                       param_dtype=config.precision.param_dtype)


def dot_dtype(precision) -> str:
  """The matmul operand dtype a model config gets ("" = its compute dtype):
  float32 for a bfloat16 model on a CPU whose bfloat16 path is "float32"
  (config.precision.cpu_bf16_dots, resolved for this CPU by lm/cpu.py).
  An ahead-of-time compile for a TPU never widens: its target decides."""
  on_cpu = backend.name() == "cpu"
  if (precision.compute_dtype == "bfloat16" and on_cpu
      and cpu.bf16_dots(precision.get("cpu_bf16_dots", "auto")) == "float32"):
    return "float32"
  return ""


def check(model_cfg, family_name: str, mesh: dict[str, int]) -> None:
  """The family's own checks of its config against the mesh's axis sizes;
  raises lm.checks.ConfigError."""
  MODELS[family_name].check(model_cfg, mesh)


def abstract_model(model_cfg, family_name: str, quantizer=None
                   ) -> nnx.Module:
  """The model without allocating. `quantizer(model, example_input)`, when
  given, wraps it for quantized execution (lm/quant)."""
  family = MODELS[family_name]

  def make():
    model = family.make(model_cfg, nnx.Rngs(0))
    if quantizer is None:
      return model
    return quantizer(model, family.example_input(model_cfg))

  # Under an active mesh nnx.eval_shape would read the logical names as mesh
  # axes; the names are mapped by our rules table instead, so hide the mesh.
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    return nnx.eval_shape(make)


def logical_specs(model: nnx.Module):
  """(graphdef, tree of logical PartitionSpecs of the parameters) of an
  (abstract) model."""
  graphdef, params = nnx.split(model)
  return graphdef, nnx.to_pure_dict(nnx.get_partition_spec(params))
