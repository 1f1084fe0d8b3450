"""Mixture-of-experts SwiGLU MLP: top-k routing, a capacity per expert.

Routing (per dispatch group of T tokens; see lm/parallel/experts.py for how
groups map to expert shards):
  - router logits and softmax in float32 (the router weight too): the top-k
    choice flips on small differences, and bf16 logits make it noisy;
  - each token picks its top_k experts; their gates are the chosen
    probabilities renormalized to sum to 1 over the k (as Mixtral), so the
    output scale does not depend on how peaked the router is;
  - an expert has C = ceil(capacity_factor * top_k * T / E) slots. Slots go
    to every token's first choice before any second choice, then in token
    order; choices past capacity are dropped (contribute 0; the residual
    stream carries the token).

Letters: B batch, L length, D model, F expert hidden, E experts, C slots per
expert, T tokens in a dispatch group, R routing choices per token (top_k).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm import checks
from lm.models import layers
from lm.parallel import constrain
from lm.parallel import experts as experts_lib


@dataclasses.dataclass(frozen=True)
class Config:
  experts: int = 0  # 0: dense MLP (MoE off).
  top_k: int = 2  # Experts per token.
  # Slots per expert = ceil(capacity_factor * top_k * T / experts), for the
  # T tokens of a group dispatched together.
  capacity_factor: float = 1.25
  z_loss: float = 1e-3  # Router z-loss (ST-MoE): mean(logsumexp(logits)^2).
  load_balance: float = 1e-2  # Switch load balancing: E * sum_e f_e * p_e.


def check(cfg: Config, mesh: dict[str, int]) -> None:
  """config.model.moe against itself and the mesh (experts > 0 only)."""
  if not cfg.experts:
    return
  checks.require(
      cfg.experts % mesh["expert"] == 0,
      f"config.model.moe.experts={cfg.experts} is not divisible by "
      f"config.mesh.expert={mesh['expert']}: each expert shard holds the "
      "same number of experts. Change one of them.")
  checks.require(1 <= cfg.top_k <= cfg.experts,
                 f"config.model.moe.top_k={cfg.top_k} must be between 1 and "
                 f"config.model.moe.experts={cfg.experts}.")
  checks.require(cfg.capacity_factor > 0,
                 f"config.model.moe.capacity_factor={cfg.capacity_factor} "
                 "must be positive.")
  checks.require(mesh["stage"] == 1,
                 "config.model.moe with config.mesh.stage > 1: the pipeline "
                 "does not carry the MoE auxiliary losses yet; use stage=1.")


def capacity(cfg: Config, tokens: int) -> int:
  return max(1, math.ceil(cfg.capacity_factor * cfg.top_k * tokens
                          / cfg.experts))


def route(cfg: Config, x_TxD: jax.Array, router_DxE: jax.Array,
          C: int) -> experts_lib.Routing:
  """One group's top-k choices, their slots (C per expert) and gates."""
  E, R, T = cfg.experts, cfg.top_k, x_TxD.shape[0]
  # HIGHEST: TPUs otherwise multiply float32 in bfloat16 passes.
  logits_TxE = jnp.einsum("td,de->te", x_TxD.astype(jnp.float32),
                          router_DxE.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  top_TxR, expert_TxR = jax.lax.top_k(probs_TxE, R)
  gate_TxR = top_TxR / jnp.sum(top_TxR, axis=-1, keepdims=True)
  # Choice-major order (all first choices, then all second ...): a running
  # count per expert in that order is each choice's position in its expert.
  chosen_RxTxE = jax.nn.one_hot(expert_TxR.T, E, dtype=jnp.int32)
  position_RxTxE = jnp.cumsum(chosen_RxTxE.reshape(R * T, E), axis=0) - 1
  position_TxR = jnp.sum(position_RxTxE.reshape(R, T, E) * chosen_RxTxE,
                         axis=-1).T
  kept_TxR = position_TxR < C
  slot_TxR = jnp.where(kept_TxR, expert_TxR * C + position_TxR, E * C)
  stats = dict(
      z=jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE, axis=-1))),
      # f_e: the share of (token, choice) assignments, before capacity.
      fraction_E=jnp.mean(chosen_RxTxE.astype(jnp.float32), axis=(0, 1)),
      probability_E=jnp.mean(probs_TxE, axis=0),
      dropped=1.0 - jnp.mean(kept_TxR.astype(jnp.float32)))
  return experts_lib.Routing(slot_TxR, gate_TxR, stats)


def swiglu(x_ExCxD: jax.Array, gate_ExDxF: jax.Array, up_ExDxF: jax.Array,
           down_ExFxD: jax.Array) -> jax.Array:
  """Every expert's SwiGLU MLP on its own slots, in x's dtype.

  The weights arrive in param_dtype and are cast here, inside the shard_map:
  the transpose then sums their gradients over the token shards in
  param_dtype (XLA:CPU cannot compile a bfloat16 all-reduce).
  """
  gate, up, down = (w.astype(x_ExCxD.dtype)
                    for w in (gate_ExDxF, up_ExDxF, down_ExFxD))
  h_ExCxF = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ExCxD, gate))
             * jnp.einsum("ecd,edf->ecf", x_ExCxD, up))
  return jnp.einsum("ecf,efd->ecd", h_ExCxF, down)


class MoeMlp(nnx.Module):
  """Returns (y_BxLxD, aux). aux holds float32 scalars: the unweighted
  "moe_z_loss", "moe_load_balance_loss" and "moe_dropped_fraction" (dropped
  (token, choice) assignments / (T * top_k)), and "moe_aux_loss", the sum
  weighted by `Config.z_loss` and `Config.load_balance`, which is the term to
  add to the training loss."""

  def __init__(self, moe: Config, d_model: int, d_ff: int, *, dtype,
               param_dtype, rngs: nnx.Rngs):
    E, D, F = moe.experts, d_model, d_ff
    if not 0 < moe.top_k <= E:
      raise ValueError(f"MoE needs 0 < top_k ({moe.top_k}) <= experts ({E}); "
                       "experts=0 means a dense MLP, not a MoeMlp.")

    def param(shape, names, fan_in, dtype_=param_dtype):
      init = layers.param_init(layers.fan_in_normal(fan_in), *names)
      return nnx.Param(init(rngs.params(), shape, dtype_))

    # float32 whatever param_dtype: routing is precision-sensitive.
    self.router = param((D, E), ("embed", None), D, jnp.float32)
    self.gate = param((E, D, F), ("experts", "embed", "mlp"), D)
    self.up = param((E, D, F), ("experts", "embed", "mlp"), D)
    self.down = param((E, F, D), ("experts", "mlp", "embed"), F)
    self.cfg = moe
    self.dtype = dtype

  def __call__(self, x_BxLxD: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.cfg
    weights = tuple(w[...] for w in (self.gate, self.up, self.down))
    y_BxLxD, stats = experts_lib.apply(
        x_BxLxD.astype(self.dtype), self.router[...], weights,
        route=functools.partial(route, cfg), experts=swiglu,
        capacity=functools.partial(capacity, cfg))
    load_balance = cfg.experts * jnp.sum(stats["fraction_E"]
                                         * stats["probability_E"])
    aux = {"moe_z_loss": stats["z"],
           "moe_load_balance_loss": load_balance,
           "moe_dropped_fraction": stats["dropped"]}
    aux["moe_aux_loss"] = (cfg.z_loss * aux["moe_z_loss"]
                           + cfg.load_balance * load_balance)
    return constrain(y_BxLxD, "batch", "length", "act_embed"), aux
