"""Mixed-precision policies and dynamic loss scaling.

`config.precision.compute_dtype` names the policy; it reaches every model
family through `lm.models.model_config` (the one place a model learns its
dtypes), so no model file knows which policy runs:

  float32   everything float32.
  bfloat16  matmuls and activations bfloat16; parameters, optimizer state and
            the loss float32. bfloat16 has float32's exponent range, so no
            loss scaling is needed.
  float16   matmuls and activations float16 with dynamic loss scaling: the
            loss is multiplied by a scale before differentiation so small
            gradients do not flush to zero, and the gradients are divided by
            it afterwards. A step whose gradients are not finite is skipped
            (parameters and optimizer state unchanged) and the scale halves;
            after `growth_interval` finite steps in a row it doubles.

In every policy the models return float32 logits, and softmax, the norms'
statistics and the loss are computed in float32 (lm/models/layers.py).

The scale lives in the train state (`TrainState.loss_scale`), so it is
sharded (replicated), donated and checkpointed with everything else.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from lm import checks

POLICIES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
CPU_BF16_DOTS = ("auto", "native", "float32")


def check(precision_cfg) -> None:
  """config.precision's dtypes. Raises ConfigError."""
  checks.one_of(precision_cfg.compute_dtype, POLICIES,
                "config.precision.compute_dtype")
  checks.one_of(precision_cfg.param_dtype, PARAM_DTYPES,
                "config.precision.param_dtype")
  checks.one_of(precision_cfg.cpu_bf16_dots, CPU_BF16_DOTS,
                "config.precision.cpu_bf16_dots")


@flax.struct.dataclass
class LossScale:
  scale: jax.Array  # float32 scalar.
  good_steps: jax.Array  # int32: finite steps since the scale last changed.
  skipped_steps: jax.Array  # int32: steps skipped in the whole run.
  growth_interval: int = flax.struct.field(pytree_node=False, default=2000)
  factor: float = flax.struct.field(pytree_node=False, default=2.0)
  min_scale: float = flax.struct.field(pytree_node=False, default=1.0)

  def adjust(self, finite: jax.Array) -> "LossScale":
    """The scale after a step whose gradients were (not) all finite."""
    grow = finite & (self.good_steps + 1 >= self.growth_interval)
    scale = jnp.where(
        finite, jnp.where(grow, self.scale * self.factor, self.scale),
        jnp.maximum(self.scale / self.factor, self.min_scale))
    good = jnp.where(finite & ~grow, self.good_steps + 1, 0)
    return self.replace(scale=scale.astype(jnp.float32),
                        good_steps=good.astype(jnp.int32),
                        skipped_steps=self.skipped_steps
                        + (~finite).astype(jnp.int32))


def initial_loss_scale(precision_cfg) -> LossScale | None:
  """The starting state for the float16 policy; None for the others."""
  if precision_cfg.compute_dtype != "float16":
    return None
  c = precision_cfg.loss_scale
  return LossScale(
      scale=jnp.asarray(c.initial, jnp.float32),
      good_steps=jnp.zeros((), jnp.int32),
      skipped_steps=jnp.zeros((), jnp.int32),
      growth_interval=int(c.growth_interval), factor=float(c.factor),
      min_scale=float(c.min_scale))


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def select(finite: jax.Array, new, old):
  """`new` where the step was finite, else `old` (a skipped step)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def metrics(loss_scale: LossScale | None) -> dict:
  if loss_scale is None:
    return {}
  return {"loss_scale": loss_scale.scale,
          "skipped_steps": loss_scale.skipped_steps}


def value_and_grad(fn, loss_scale: LossScale | None, has_aux: bool = False):
  """`jax.value_and_grad(fn)` that differentiates `loss * scale` and returns
  the unscaled loss and gradients (plain value_and_grad without a scale)."""
  if loss_scale is None:
    return jax.value_and_grad(fn, has_aux=has_aux)
  scale = loss_scale.scale

  def scaled(*args):
    out = fn(*args)
    loss, aux = out if has_aux else (out, None)
    return loss * scale, (loss, aux)

  def wrapped(*args):
    (_, (loss, aux)), g = jax.value_and_grad(scaled, has_aux=True)(*args)
    g = jax.tree.map(lambda x: x / scale.astype(x.dtype), g)
    return ((loss, aux) if has_aux else loss), g
  return wrapped
