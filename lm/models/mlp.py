"""MLP classifier for images: flatten -> depth x (dense, [layer norm],
activation, dropout) -> linear head -> float32 logits.

Hidden layers alternate their logical names, ("embed", "mlp") then
("mlp", "embed"), as a Transformer MLP does: under tensor parallelism a pair
of layers is column- then row-parallel, so activations are reduced once per
pair; FSDP splits every weight's "embed" axis.

Shapes: B batch, P pixels (H*W*C), F hidden width, C classes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lm import checks
from lm.models import layers
from lm.parallel import constrain

OPTIMIZER_GROUPS = ()  # One optimizer state for all parameters.


@dataclasses.dataclass(frozen=True)
class Config:
  image_shape: tuple[int, int, int] = (8, 8, 1)  # H x W x C of the inputs.
  num_classes: int = 10
  depth: int = 2  # Hidden layers.
  width: int = 256  # Hidden units per layer.
  activation: str = "gelu"  # A key of layers.ACTIVATIONS.
  dropout: float = 0.1
  layer_norm: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"


def check(cfg: Config, mesh: dict[str, int]) -> None:
  checks.one_of(cfg.activation, layers.ACTIVATIONS, "config.model.activation")
  checks.require(cfg.depth >= 1 and cfg.width >= 1, "config.model.depth and "
                 "config.model.width must be positive.")
  checks.require(0.0 <= cfg.dropout < 1.0,
                 f"config.model.dropout={cfg.dropout} must be in [0, 1).")
  layers.no_transformer_axes(mesh)


def _names(i: int) -> tuple[str, str]:
  return ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")


class Model(nnx.Module):
  """Images B x H x W x C (in [-1, 1]) -> logits B x C."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    h, w, c = cfg.image_shape
    widths = [h * w * c] + [cfg.width] * cfg.depth
    self.hidden = nnx.List([
        layers.Dense(widths[i], widths[i + 1], _names(i), dtype=cfg.dtype,
                     param_dtype=cfg.param_dtype, rngs=rngs)
        for i in range(cfg.depth)])
    self.norms = nnx.List([
        layers.LayerNorm(cfg.width, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, rngs=rngs)
        for _ in range(cfg.depth if cfg.layer_norm else 0)])
    self.head = layers.Dense(widths[-1], cfg.num_classes,
                             (_names(cfg.depth)[0], "classes"),
                             dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             rngs=rngs)

  def features(self, images_BxHxWxC: jax.Array,
               dropout_key: jax.Array | None = None) -> jax.Array:
    """The last hidden layer (B x F): what the GAN metrics compare."""
    cfg = self.cfg
    x = images_BxHxWxC.reshape(images_BxHxWxC.shape[0], -1)
    x = constrain(x, "batch", None)
    act = layers.ACTIVATIONS[cfg.activation]
    keys = (jax.random.split(dropout_key, cfg.depth)
            if dropout_key is not None else [None] * cfg.depth)
    for i, dense in enumerate(self.hidden):
      x = dense(x)
      if cfg.layer_norm:
        x = self.norms[i](x)
      x = layers.dropout(act(x), cfg.dropout, keys[i])
      x = constrain(x, "batch", "act_mlp" if i % 2 == 0 else "act_embed")
    return x

  def __call__(self, images_BxHxWxC: jax.Array,
               dropout_key: jax.Array | None = None) -> jax.Array:
    logits_BxC = self.head(self.features(images_BxHxWxC, dropout_key))
    return logits_BxC.astype(jnp.float32)


def make(cfg: Config, rngs: nnx.Rngs) -> Model:
  return Model(cfg, rngs)


def example_input(cfg: Config) -> jax.Array:
  """A batch `__call__` accepts (tools that trace the model, e.g. lm/quant)."""
  return jnp.zeros((1, *cfg.image_shape), jnp.float32)
