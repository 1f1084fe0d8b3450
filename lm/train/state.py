"""The train state, and creating it already sharded.

abstract model (nnx.eval_shape) -> logical specs from parameter metadata ->
mesh shardings through the rules table -> jitted init with `out_shardings`,
so no device ever holds an unsharded copy of the parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import models, quant
from lm.parallel import rules as rules_lib
from lm.train import optim, precision


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any  # Nested dict of arrays (nnx.merge accepts it directly).
  opt_state: Any
  # float16 only: the dynamic loss scale (lm/train/precision.py); else None.
  loss_scale: Any = None


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static that the step functions and the loop need."""
  mesh: Mesh
  rules: rules_lib.Rules
  model_cfg: Any
  graphdef: nnx.GraphDef
  tx: Any  # optax transformation, or {group: transformation} (the GAN).
  schedule: optax.Schedule
  abstract_state: TrainState  # ShapeDtypeStructs carrying shardings.
  state_shardings: TrainState
  init_fn: Any  # jitted: key -> sharded TrainState.
  seed: int = 0  # config.seed: the init key and the per-step keys.
  # (config.train.grad_reduce, grad_reduce_dtype): lm/parallel/reduce.py.
  grad_reduce: tuple[str, str] = ("auto", "float32")

  @property
  def param_shardings(self):
    return self.state_shardings.params

  def batch_sharding(self, ndim: int = 2, key: str = "tokens"
                     ) -> NamedSharding:
    """Rows over the batch axes (data, fsdp, expert); the other axes whole.
    Token windows are L + 1 long (inputs and shifted targets), which a
    `sequence` axis cannot split evenly, and integer tokens are cheap to
    replicate: the model splits its activations' length axis itself."""
    del key
    return NamedSharding(self.mesh, self.rules("batch", *[None] * (ndim - 1)))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def abstract_model(model_cfg, family_name: str, quantizer=None
                   ) -> nnx.Module:
  """The model without allocating. `quantizer(model, example_input)`, when
  given, wraps it for quantized execution (lm/quant)."""
  family = models.MODELS[family_name]

  def make():
    model = family.make(model_cfg, nnx.Rngs(0))
    if quantizer is None:
      return model
    return quantizer(model, family.example_input(model_cfg))

  # Under an active mesh nnx.eval_shape would read the logical names as mesh
  # axes; the names are mapped by our rules table instead, so hide the mesh.
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    return nnx.eval_shape(make)


def logical_param_specs(model_cfg, family_name: str, quant_cfg=None):
  """Returns (graphdef, logical PartitionSpec tree) without allocating. The
  graphdef is the quantized model's when `quant_cfg` asks for QAT; its
  parameters are the float model's."""
  quantizer = None
  if quant_cfg is not None and quant_cfg.get("mode", "none") != "none":
    quantizer = lambda m, x: quant.quantize(m, quant_cfg, x)  # noqa: E731
  abstract_model_ = abstract_model(model_cfg, family_name, quantizer)
  graphdef, abstract_params = nnx.split(abstract_model_)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  return graphdef, logical


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Replicates a dimension its mesh axes do not divide evenly (e.g. a
  1-channel conv input, a 10-class head under tensor=4): jit shardings must
  divide, and such small dimensions gain nothing from splitting."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = rules_lib.axis_names(axes)
    ways = int(np.prod([mesh.shape[a] for a in names]))
    fitted.append(axes if dim % ways == 0 else None)
  return P(*fitted)


def make_setup(config, mesh: Mesh, rules: rules_lib.Rules | None = None
               ) -> Setup:
  rules = rules or rules_lib.Rules()
  model_cfg = models.model_config(config)
  family = models.MODELS[config.model.name]
  graphdef, logical = logical_param_specs(model_cfg, config.model.name,
                                          config.get("quant", None))
  tx, schedule = optim.make(config.optimizer, config.train.steps,
                            config.get("prune", None))
  # A family with several parameter groups (the GAN) gets one optimizer
  # state per group, updated separately by its train step.
  groups = getattr(family, "OPTIMIZER_GROUPS", None)
  if groups:
    tx = {g: tx for g in groups}

  def init(key: jax.Array) -> TrainState:
    model = family.make(model_cfg, nnx.Rngs(params=key))
    params = nnx.to_pure_dict(nnx.state(model))
    opt_state = ({g: tx[g].init(params[g]) for g in groups} if groups
                 else tx.init(params))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=opt_state,
                      loss_scale=precision.initial_loss_scale(
                          config.precision))

  key = jax.random.key(config.seed)
  abstract = jax.eval_shape(init, key)
  param_shardings = jax.tree.map(
      lambda spec, x: NamedSharding(mesh, fit_spec(rules.spec(spec), x.shape,
                                                   mesh)),
      logical, abstract.params, is_leaf=lambda x: isinstance(x, P))
  replicated = NamedSharding(mesh, P())

  def opt_shardings_of(tx_, opt_state, shardings):
    return optax.tree_map_params(
        tx_, lambda _, sharding: sharding, opt_state, shardings,
        transform_non_params=lambda _: replicated)

  if groups:
    opt_shardings = {g: opt_shardings_of(tx[g], abstract.opt_state[g],
                                         param_shardings[g]) for g in groups}
  else:
    opt_shardings = opt_shardings_of(tx, abstract.opt_state, param_shardings)
  shardings = TrainState(
      step=replicated, params=param_shardings, opt_state=opt_shardings,
      loss_scale=jax.tree.map(lambda _: replicated, abstract.loss_scale))
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)
  init_fn = jax.jit(init, out_shardings=shardings)
  return Setup(mesh=mesh, rules=rules, model_cfg=model_cfg, graphdef=graphdef,
               tx=tx, schedule=schedule, abstract_state=abstract,
               state_shardings=shardings, init_fn=init_fn, seed=config.seed,
               grad_reduce=(config.train.get("grad_reduce", "auto"),
                            config.train.get("grad_reduce_dtype", "float32")))


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
