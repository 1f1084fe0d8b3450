"""Transformer encoder classifier: the LM's `Transformer` stack (no copy of
the blocks) with bidirectional attention, then mean (or first-token) pooling
and a linear head.

Shapes: B batch, L length, D d_model, C classes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lm import checks
from lm.models import layers, transformer
from lm.parallel import constrain

POOLS = ("mean", "first")
OPTIMIZER_GROUPS = ()  # One optimizer state for all parameters.


@dataclasses.dataclass(frozen=True)
class Config(transformer.Config):
  causal: bool = False  # An encoder: every token sees the whole passage.
  num_classes: int = 4
  pool: str = "mean"  # mean | first (the first token's final state).


def check(cfg: Config, mesh: dict[str, int]) -> None:
  transformer.check(cfg, mesh)
  checks.one_of(cfg.pool, POOLS, "config.model.pool")


class Model(nnx.Module):
  """Tokens B x L -> float32 logits B x C."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    self.transformer = transformer.Transformer(cfg, rngs)
    self.head = layers.Dense(cfg.d_model, cfg.num_classes,
                             ("embed", "classes"), dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, tokens_BxL: jax.Array,
               dropout_key: jax.Array | None = None) -> jax.Array:
    del dropout_key  # The Transformer blocks have no dropout.
    x_BxLxD, _ = self.transformer(tokens_BxL)
    return self.classify(x_BxLxD)

  def classify(self, x_BxLxD: jax.Array) -> jax.Array:
    """Final hidden states -> float32 logits B x C (pooling and head)."""
    if self.cfg.pool == "mean":
      pooled_BxD = x_BxLxD.astype(jnp.float32).mean(axis=1)
    else:
      pooled_BxD = x_BxLxD[:, 0].astype(jnp.float32)
    pooled_BxD = constrain(pooled_BxD, "batch", "act_embed")
    return self.head(pooled_BxD).astype(jnp.float32)


def make(cfg: Config, rngs: nnx.Rngs) -> Model:
  return Model(cfg, rngs)


def example_input(cfg: Config) -> jax.Array:
  """A batch `__call__` accepts (tools that trace the model, e.g. lm/quant)."""
  return jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)
