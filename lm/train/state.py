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

from lm import models, quant
from lm.parallel import rules as rules_lib
from lm.train import lora, optim, precision, privacy, prune


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any  # Nested dict of arrays (nnx.merge accepts it directly).
  opt_state: Any
  # float16 only: the dynamic loss scale (lm/train/precision.py); else None.
  loss_scale: Any = None


# The init program runs once, and on XLA:CPU it took as long to compile as
# the train step (the tiny LM on 8 devices: 2.6 s of a 10 s two-step run):
# its random-number kernels are many, and LLVM optimizes each at level 3.
# At level 1 it gives the same bits (tests/train/test_state.py) and compiles
# 0.4-0.8 s sooner; what it adds to the run is less (docs/performance.md,
# "Compile time"). CPU only: measured there, and other backends' compilers
# take their own options.
INIT_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_compiler_options(mesh: Mesh) -> dict | None:
  """XLA options for compiling the init program on `mesh`'s devices."""
  if mesh.devices.flat[0].platform == "cpu":
    return dict(INIT_CPU_COMPILER_OPTIONS)
  return None


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything static that the step functions and the loop need. (The
  logical-axis rules table is `lm.parallel.rules.current()`.)"""
  mesh: Mesh
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
  # LoRA (lm/train/lora.py): `params` are the adapters; the frozen base is
  # an argument of the jitted steps. Its ShapeDtypeStructs (with shardings):
  frozen_abstract: Any = None
  # Inside a jitted LoRA step only: the base's arrays (step.py puts them).
  frozen: Any = None
  # LoRA with adapter dropout: the graph that drops (`graphdef` does not).
  train_graphdef: Any = None
  # DP-SGD (lm/train/privacy.py): the clip and noise of the private
  # gradient; None = ordinary gradients.
  privacy: Any = None

  @property
  def param_shardings(self):
    return self.state_shardings.params

  @property
  def frozen_shardings(self):
    return (None if self.frozen_abstract is None else
            jax.tree.map(lambda x: x.sharding, self.frozen_abstract))

  def batch_sharding(self, ndim: int = 2) -> NamedSharding:
    """Rows over the batch axes (data, fsdp, expert); the other axes whole.
    Token windows are L + 1 long (inputs and shifted targets), which a
    `sequence` axis cannot split evenly, and integer tokens are cheap to
    replicate: the model splits its activations' length axis itself."""
    return NamedSharding(self.mesh,
                         rules_lib.current()("batch", *[None] * (ndim - 1)))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def logical_param_specs(model_cfg, family_name: str, quant_cfg=None):
  """Returns (graphdef, logical PartitionSpec tree) without allocating. The
  graphdef is the quantized model's when `quant_cfg` asks for QAT (a
  pattern that matches no layer raises QuantError here); its parameters are
  the float model's."""
  quantizer = None
  if quant_cfg is not None and quant_cfg.mode != "none":
    quantizer = lambda m, x: quant.quantize(m, quant_cfg, x)  # noqa: E731
  return models.logical_specs(
      models.abstract_model(model_cfg, family_name, quantizer))


def make_setup(config, mesh: Mesh) -> Setup:
  """The model, optimizer and state shardings of a resolved config on
  `mesh`, through the current rules table. Raises ConfigError when a
  config.quant or config.prune pattern matches nothing (the patterns need
  the model), before anything is compiled."""
  model_cfg = models.model_config(config)
  family = models.MODELS[config.model.name]
  adapted = None
  if lora.enabled(config):
    model_cfg = lora.model_config(model_cfg)
    adapted = lora.graphs(model_cfg, config.model.name, config.lora)
    graphdef, logical = adapted.graphdef, adapted.adapters_logical
  else:
    graphdef, logical = logical_param_specs(model_cfg, config.model.name,
                                            config.quant)
  tx, schedule = optim.make(config.optimizer, config.train.steps,
                            config.prune)
  # A family with several parameter groups (the GAN) gets one optimizer
  # state per group, updated separately by its train step.
  groups = family.OPTIMIZER_GROUPS
  if groups:
    tx = {g: tx for g in groups}

  def init(key: jax.Array) -> TrainState:
    if adapted is not None:
      params = lora.init_adapters(model_cfg, config.model.name, config.lora,
                                  key)
    else:
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
  if config.prune.sparsity:
    prune.check_patterns(tuple(config.prune.layers), abstract.params)
  param_shardings = jax.tree.map(
      lambda spec, x: rules_lib.param_sharding(mesh, spec, x.shape),
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
  init_fn = jax.jit(init, out_shardings=shardings,
                    compiler_options=init_compiler_options(mesh))
  lora_fields = {}
  if adapted is not None:
    lora_fields = dict(
        frozen_abstract=jax.tree.map(
            lambda spec, x: jax.ShapeDtypeStruct(
                x.shape, x.dtype,
                sharding=rules_lib.param_sharding(mesh, spec, x.shape)),
            adapted.base_logical, adapted.base_abstract,
            is_leaf=lambda x: isinstance(x, P)),
        train_graphdef=adapted.train_graphdef)
  return Setup(mesh=mesh, model_cfg=model_cfg, graphdef=graphdef, tx=tx,
               schedule=schedule, abstract_state=abstract,
               state_shardings=shardings, init_fn=init_fn, seed=config.seed,
               grad_reduce=(config.train.grad_reduce,
                            config.train.grad_reduce_dtype),
               privacy=privacy.from_config(config), **lora_fields)


def state_from_params(setup: Setup, config, params) -> TrainState:
  """A step-0 train state around given (sharded) parameters, with the
  optimizer state `init_fn` would make. For parameters that come from
  elsewhere (an import, another run). The optimizer state is made op by op
  (each op keeps its input's sharding), not by one jitted program over the
  whole state, whose buffers an import of a large model cannot spare."""
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=setup.tx.init(params),
                     loss_scale=precision.initial_loss_scale(config.precision))
  return jax.device_put(state, setup.state_shardings)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
