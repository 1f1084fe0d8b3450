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
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm import models
from lm.parallel import rules as rules_lib
from lm.train import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any  # Nested dict of arrays (nnx.merge accepts it directly).
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static that the step functions and the loop need."""
  mesh: Mesh
  rules: rules_lib.Rules
  model_cfg: Any
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState  # ShapeDtypeStructs carrying shardings.
  state_shardings: TrainState
  init_fn: Any  # jitted: key -> sharded TrainState.

  @property
  def param_shardings(self):
    return self.state_shardings.params

  def batch_sharding(self, ndim: int = 2) -> NamedSharding:
    return NamedSharding(self.mesh,
                         self.rules("batch", *(["length"] * (ndim - 1))))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def logical_param_specs(model_cfg, family_name: str):
  """Returns (graphdef, logical PartitionSpec tree) without allocating."""
  family = models.MODELS[family_name]
  # Under an active mesh nnx.eval_shape would read the logical names as mesh
  # axes; the names are mapped by our rules table instead, so hide the mesh.
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
    abstract_model = nnx.eval_shape(
        lambda: family.make(model_cfg, nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
  return graphdef, logical


def make_setup(config, mesh: Mesh, rules: rules_lib.Rules | None = None
               ) -> Setup:
  rules = rules or rules_lib.Rules()
  model_cfg = models.model_config(config)
  family = models.MODELS[config.model.name]
  graphdef, logical = logical_param_specs(model_cfg, config.model.name)
  param_shardings = jax.tree.map(
      lambda spec: NamedSharding(mesh, rules.spec(spec)), logical,
      is_leaf=lambda x: isinstance(x, P))
  tx, schedule = optim.make(config.optimizer, config.train.steps)

  def init(key: jax.Array) -> TrainState:
    model = family.make(model_cfg, nnx.Rngs(params=key))
    params = nnx.to_pure_dict(nnx.state(model))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params))

  key = jax.random.key(config.seed)
  abstract = jax.eval_shape(init, key)
  replicated = NamedSharding(mesh, P())
  opt_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract.opt_state, param_shardings,
      transform_non_params=lambda _: replicated)
  shardings = TrainState(step=replicated, params=param_shardings,
                         opt_state=opt_shardings)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)
  init_fn = jax.jit(init, out_shardings=shardings)
  return Setup(mesh=mesh, rules=rules, model_cfg=model_cfg, graphdef=graphdef,
               tx=tx, schedule=schedule, abstract_state=abstract,
               state_shardings=shardings, init_fn=init_fn)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
