"""LoRA and QLoRA fine-tuning (Hu et al. 2021; Dettmers et al. 2023):
`config.lora` -> low-rank adapters trained on a frozen base run.

Each projection that `layers` names gets two adapters, A (the kernel's input
axes x rank) and B (rank x the kernel's output axes), and computes

  y = x W + (alpha / rank) * (x A) B

with qwix's LoRA provider, which intercepts the projection's einsum as QAT
does (lm/quant/qat.py). A is random, B zero, so at step 0 the adapted model
computes exactly what the base does. Only A and B are trained: the train
state's `params` are the adapters alone, so the optimizer state, the
gradient norm, weight decay and the checkpoints cover adapters only. The
base (every parameter of the run in config.train.init_from) is a separate
pytree, sharded by the same rules table as a normal run, that enters each
jitted train and eval step as an argument: never a constant of the program,
never donated, never differentiated. The adapters carry logical axis names
(A: the kernel's input axes + None for the rank; B: None + the kernel's
output axes), so the same table shards them.

config.lora:
  rank        the adapters' rank; 0 = off (an ordinary run).
  alpha       the update is scaled by alpha / rank.
  layers      regexes, each fully matching module paths such as
              "transformer/blocks/0/attn/q" (configs/lm.py: every attention
              and MLP projection). The embedding, norms and head stay frozen.
  dropout     dropout on the adapters' inputs in training (not on x W);
              drawn from the step's key, so a resumed run is exact.
  base_quant  none | int8 | int4 (QLoRA): the frozen base's matched kernels
              are stored as int8 / int4 values with float32 per-output-channel
              scales (qwix's PTQ arrays), and the base's forward pass runs on
              them; the adapters and everything unmatched stay float.

Needs config.train.init_from (a plain run of the same model: a LoRA run
must be merged first). Not with distillation, pruning, QAT, scanned layers
(config.model.scan_layers, hence no pipeline), mixture-of-experts layers,
an explicit config.train.grad_reduce, or other families than the
transformer LM.

A LoRA run directory holds config.json (config.lora, config.train.init_from)
and lora_base.json (the base run's absolute path and the checkpoint step
the adapters were trained on); its checkpoints hold the adapters, their
optimizer state, the step and the data iterator, nothing of the base (a
LoRA checkpoint of a 1B model at rank 8 on every projection is megabytes).
Resuming refuses a base run whose latest step has changed.

Reading a LoRA run (lm/run/restore.py `load`: generate, eval, compare,
export_hf) gives the MERGED plain parameters, W + (alpha / rank) A B, with
the plain model: every tool works unchanged. scripts/merge_lora.py writes
them as a plain run. With base_quant, merging dequantizes the base: the
merged kernels are the int8/int4 values times their scales plus the update
(float32), not the original float base.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import qwix
from flax import nnx
# qwix internals the provider below needs (qwix 0.1.8, pinned).
from qwix._src.providers import lora as _qwix_lora
from qwix._src.providers import ptq as _qwix_ptq
from qwix._src.utils import flax_util as _qwix_flax_util

from lm import checks, models
from lm.models import tuning
from lm.quant import qat

# config.lora.base_quant -> the frozen kernels' storage dtype; None = float.
BASE_QUANT = {"none": None, "int8": jnp.int8, "int4": jnp.int4}
# The families LoRA adapts (their projections are lm/models/layers.Einsum).
FAMILIES = ("transformer",)


def enabled(config) -> bool:
  return config.lora.rank > 0


def scale(lora_cfg) -> float:
  return float(lora_cfg.alpha) / int(lora_cfg.rank)


def check(lora_cfg) -> None:
  """config.lora's own values (the patterns need the model: `adapt`; what
  LoRA combines with spans sections: lm/run/checks.py)."""
  checks.require(isinstance(lora_cfg.rank, int) and lora_cfg.rank >= 0,
                 f"config.lora.rank={lora_cfg.rank!r} must be an integer "
                 ">= 0 (0 = off).")
  if not lora_cfg.rank:
    return
  checks.require(lora_cfg.alpha > 0, f"config.lora.alpha={lora_cfg.alpha} "
                 "must be positive (the update is scaled by alpha / rank).")
  checks.require(0.0 <= lora_cfg.dropout < 1.0,
                 f"config.lora.dropout={lora_cfg.dropout} must be in [0, 1).")
  checks.one_of(lora_cfg.base_quant, BASE_QUANT, "config.lora.base_quant")
  checks.require(bool(lora_cfg.layers),
                 "config.lora.layers is empty: list the module-path patterns "
                 "to adapt, e.g. ['.*blocks/.*attn/[qkvo]'].")


def rules(lora_cfg, dropout: bool = True) -> list[qwix.LoraRule]:
  """One qwix rule per `layers` pattern. Without `dropout` the rules drop
  nothing (qwix applies a rule's dropout on every call: evaluation and
  merging use a graph built without it)."""
  weights = BASE_QUANT[lora_cfg.base_quant]
  return [qwix.LoraRule(
      module_path=pattern, rank=int(lora_cfg.rank),
      alpha=float(lora_cfg.alpha),
      dropout=float(lora_cfg.dropout) if dropout else 0.0,
      weight_qtype=weights,
      weight_calibration_method=qat.calibration(weights))
          for pattern in lora_cfg.layers]


class _Provider(qwix.LoraProvider):
  """qwix's LoRA provider with the adapters' update computed as two
  `tuning.weight_einsum`s, (x A) then (x A) B, instead of qwix's one
  three-operand einsum. The adapters' gradients contract over the tokens;
  under plain autodiff XLA:CPU transposes the B x L x F activation
  gradient for them inside the backward fusions (measured: a LoRA step of
  the tiny preset took 2.5x a full fine-tuning step), which weight_einsum
  avoids as it does for every plain projection. Same math; the rest (the
  rules, creating A and B, dropout) is qwix's own code path. Written
  against qwix 0.1.8 (pinned): it calls two of its private helpers."""

  def einsum(self, einsum_str, *operands, **kwargs):
    if len(operands) != 2:  # qwix's own error.
      return super().einsum(einsum_str, *operands, **kwargs)
    # The base projection (quantized under QLoRA), without qwix's adapter.
    res = super(qwix.LoraProvider, self).einsum(einsum_str, *operands,
                                                **kwargs)
    rule, _ = self._get_current_rule_and_op_id("einsum", repeated_call=True)
    if not isinstance(rule, qwix.LoraRule):
      return res
    lhs, rhs = operands
    weight_name = _qwix_flax_util.find_param(rhs, _qwix_ptq.WithAux)
    if weight_name is None:  # Not a weight.
      return res
    a_shape, b_shape, lora_str, a_transpose, b_transpose = (
        _qwix_lora._parse_einsum_str_for_lora(  # noqa: SLF001
            lhs.shape, rhs.shape, einsum_str, rule.rank))
    module = _qwix_flax_util.get_current_module()
    # What merging reads (`merge`): the adapters' axes.
    setattr(module, weight_name + "_lora_einsum_str", lora_str)
    lora_a, lora_b = _qwix_lora._get_or_create_lora_params(  # noqa: SLF001
        name=weight_name, rule=rule, a_shape=a_shape, b_shape=b_shape,
        a_sharding_transpose=a_transpose, b_sharding_transpose=b_transpose)
    if rule.dropout > 0:
      lhs = nnx.Dropout(rule.dropout, deterministic=False)(
          lhs, rngs=_qwix_flax_util.make_rng("dropout"))
    x_str, a_str, b_str = lora_str.split("->")[0].split(",")
    out_str = lora_str.split("->")[1]
    h_str = "".join(c for c in x_str if c in out_str) + a_str[-1]
    h = tuning.weight_einsum(f"{x_str},{a_str}->{h_str}", lhs, lora_a)
    update = tuning.weight_einsum(f"{h_str},{b_str}->{out_str}", h, lora_b)
    return res + update.astype(res.dtype) * (rule.alpha / rule.rank)


def model_config(model_cfg):
  """The family's Config for an adapted model: qwix intercepts jnp.einsum
  and finds the kernel by tracing it back, which the custom VJP of
  einsum_grad="small_left" would hide."""
  if any(f.name == "einsum_grad" for f in dataclasses.fields(model_cfg)):
    return dataclasses.replace(model_cfg, einsum_grad="autodiff")
  return model_cfg


def adapt(model: nnx.Module, lora_cfg, example_input, key: jax.Array,
          dropout: bool = True) -> nnx.Module:
  """`model` with adapters on the layers `lora_cfg.layers` names (A drawn
  from `key`, B zero). Raises ConfigError for a pattern that matches no
  projection."""
  provider = _Provider(rules(lora_cfg, dropout))
  # The adapters are made in a first call, which also drops with dropout.
  adapted = qwix.apply_lora_to_model(model, provider, example_input,
                                     rngs=nnx.Rngs(params=key, dropout=key))
  unused = [r.module_path for r in provider.get_unused_rules()]
  if unused:
    paths = ["/".join(map(str, p)) for p, m in nnx.iter_modules(model)
             if "kernel" in vars(m)]
    raise checks.ConfigError(
        f"config.lora.layers: {unused[0]!r} matches no layer with a matmul; "
        f"patterns must fully match module paths such as {paths[:6]}.")
  return adapted


def split(model: nnx.Module):
  """(graphdef, adapters, base) of an adapted model; the pure dicts that
  `merge_model` takes back."""
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
  return graphdef, nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)


def merge_model(graphdef, adapters, base, key: jax.Array | None = None
                ) -> nnx.Module:
  """The adapted module; `key` feeds the adapters' dropout (a graph built
  with it needs one)."""
  model = nnx.merge(graphdef, adapters, base)
  if key is not None:
    # qwix draws LoRA dropout from the modules' `qwix_rngs`.
    model.set_attributes(qwix_rngs=nnx.Rngs(dropout=key))
  return model


@dataclasses.dataclass(frozen=True)
class Graphs:
  """An adapted model, abstract: its graphs, and its adapters' and base's
  logical specs and shapes."""
  graphdef: nnx.GraphDef  # No dropout: evaluation and merging.
  train_graphdef: nnx.GraphDef | None  # With dropout; None when it is 0.
  adapters_logical: Any
  base_logical: Any
  adapters_abstract: Any
  base_abstract: Any


def graphs(model_cfg, family_name: str, lora_cfg) -> Graphs:
  """The adapted model of `model_cfg` without allocating (`model_cfg` from
  `model_config`). Raises ConfigError for a pattern that matches nothing."""
  def abstract(dropout):
    return models.abstract_model(
        model_cfg, family_name,
        lambda m, x: adapt(m, lora_cfg, x, jax.random.key(0), dropout))

  model = abstract(False)
  graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
  specs = [nnx.to_pure_dict(nnx.get_partition_spec(s))
           for s in (adapters, base)]
  train_graphdef = None
  if lora_cfg.dropout:
    train_graphdef = nnx.split(abstract(True), nnx.LoRAParam, ...)[0]
  return Graphs(graphdef=graphdef, train_graphdef=train_graphdef,
                adapters_logical=specs[0], base_logical=specs[1],
                adapters_abstract=nnx.to_pure_dict(adapters),
                base_abstract=nnx.to_pure_dict(base))


def init_adapters(model_cfg, family_name: str, lora_cfg, key: jax.Array):
  """Fresh adapters (a pure dict): A random, B zero. Under jit the base
  that qwix builds around them is dead code and never computed."""
  family = models.MODELS[family_name]
  base_key, adapter_key = jax.random.split(key)
  model = family.make(model_cfg, nnx.Rngs(params=base_key))
  adapted = adapt(model, lora_cfg, family.example_input(model_cfg),
                  adapter_key, dropout=False)
  return split(adapted)[1]


def base_from(float_params, graphdef, adapters_abstract, base_abstract,
              lora_cfg):
  """The frozen base from a plain run's parameters: the same tree, or
  with base_quant the matched kernels quantized (qwix PTQ arrays: int8 or
  int4 values and float32 scales). The abstract trees are Setup's (the
  adapters' and `frozen_abstract`). Jit it with the base's shardings."""
  if lora_cfg.base_quant == "none":
    return float_params
  model = nnx.merge(graphdef, adapters_abstract, base_abstract)
  return qwix.quantize_params(float_params, model)


def count_base(base) -> int:
  """The base's parameters (a quantized kernel counts its values, not its
  scales)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(base)
  return sum(int(x.size) for path, x in flat
             if not (len(path) > 1 and getattr(path[-2], "key", None) == "array"
                     and path[-1].key != "qvalue"))


def nbytes(tree) -> int:
  """Bytes of one copy of a tree's arrays, as XLA:CPU stores them (an int4
  value in a whole byte; TPUs and GPUs pack two to a byte)."""
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _dequantized(kernel) -> jax.Array:
  array = getattr(kernel, "array", None)  # qwix's WithAux (not exported).
  if isinstance(array, qwix.QArray):  # QLoRA: the values times scales.
    return qwix.dequantize(jax.tree.map(
        lambda v: v[...], array,
        is_leaf=lambda v: isinstance(v, nnx.Variable)))
  return kernel[...]


def merge(graphdef, adapters, base, lora_cfg):
  """Plain parameters (the plain model's tree): every adapted kernel
  becomes W + (alpha / rank) * A B, in W's dtype, with W dequantized under
  base_quant. `graphdef` is Graphs.graphdef."""
  model = nnx.merge(graphdef, adapters, base)
  s = scale(lora_cfg)
  for _, module in nnx.iter_modules(model):
    names = [n for n in vars(module) if n.endswith("_lora_a")]
    for name in names:
      weight = name.removesuffix("_lora_a")
      # qwix records the adapters' einsum, "x,A,B->y"; the kernel's axes
      # are the right operand of the layer's own equation.
      _, a, b = getattr(module, f"{weight}_lora_einsum_str").split(
          "->")[0].split(",")
      w = module.equation.split("->")[0].split(",")[1]
      kernel = _dequantized(getattr(module, weight))
      dtype = kernel.dtype
      delta = jnp.einsum(f"{a},{b}->{w}", getattr(module, name)[...],
                         getattr(module, f"{weight}_lora_b")[...],
                         precision=jax.lax.Precision.HIGHEST)
      merged = (kernel.astype(jnp.float32) + s * delta.astype(jnp.float32))
      setattr(module, weight, nnx.Param(merged.astype(dtype)))
      delattr(module, name)
      delattr(module, f"{weight}_lora_b")
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def plain_config(config) -> ml_collections.ConfigDict:
  """`config` as the plain run its merged parameters are: LoRA off, no
  base run to start from."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.lora.rank = 0
  out.train.init_from = ""
  return out


def adapted_layers(adapters) -> int:
  """How many projections carry adapters."""
  flat, _ = jax.tree_util.tree_flatten_with_path(adapters)
  return sum(str(path[-1].key).endswith("_lora_a") for path, _ in flat)
