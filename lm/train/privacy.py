"""DP-SGD's gradient: per-example gradients, each clipped, summed, noised
once per global batch, averaged (Abadi et al. 2016; Opacus' recipe).

    g = (sum_i mask_i * clip(g_i, C) + N(0, (sigma * C)^2 I)) / B

An example is whatever the task's loss takes a batch of one of (an image,
a text passage, one window of the LM's token stream), and g_i the gradient
of its loss alone: the loss of a batch of one, a mean over its tokens for
the LM. `mask_i` is 0 for the padding rows of a Poisson-sampled batch
(lm/data/poisson.py) and B is the expected batch size (config.train.batch_
size), as Opacus divides by it: dividing by the batch actually drawn would
make the update depend on a count the noise does not hide.

Per-example gradients are `jax.vmap` of the loss on one example inside the
jitted, sharded step: the example axis is split over the batch mesh axes
(vmap's `spmd_axis_name`), so each device holds the gradients of its own
rows, and the sum over the batch is XLA's usual all-reduce.

The noise is drawn from the step's key with every parameter's global shape
and constrained to that parameter's sharding: jax's partitionable threefry
makes the values independent of the mesh, so any mesh adds the same noise
(tests/train/test_privacy.py), once per global batch, not once per device.

The accountant (how much privacy that spends) is lm/train/accountant.py.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lm import checks
from lm.parallel import constrain, rules as rules_lib

SAMPLINGS = ("poisson", "shuffle")
ACCOUNTANTS = ("rdp", "pld")


@dataclasses.dataclass(frozen=True)
class Noise:
  """What the step needs (static): the clip, the noise and the divisor."""
  clip_norm: float
  noise_multiplier: float
  expected_batch: int  # The divisor: config.train.batch_size.

  @property
  def std(self) -> float:
    return self.noise_multiplier * self.clip_norm


def enabled(c) -> bool:
  """Whether config.privacy `c` turns DP-SGD on."""
  return c.noise_multiplier > 0 or c.target_epsilon > 0


def from_config(config, noise_multiplier: float | None = None
                ) -> Noise | None:
  """The step's Noise for a resolved config (None: privacy off);
  `noise_multiplier` overrides the config's (a calibrated one)."""
  c = config.privacy
  if not enabled(c):
    return None
  sigma = c.noise_multiplier if noise_multiplier is None else noise_multiplier
  return Noise(float(c.clip_norm), float(sigma),
               int(config.train.batch_size))


def check(c, defaults) -> None:
  """config.privacy on its own; `defaults` is the base config's section (a
  key set while privacy is off would be ignored: an error)."""
  key = "config.privacy."
  if not enabled(c):
    changed = [k for k in sorted(defaults) if c[k] != defaults[k]]
    checks.require(not changed, f"{key}{changed[0] if changed else ''} is "
                   "set but privacy is off; set config.privacy."
                   "noise_multiplier or config.privacy.target_epsilon > 0 to "
                   "train with DP-SGD, or leave config.privacy alone.")
    return
  checks.one_of(c.sampling, SAMPLINGS, f"{key}sampling")
  checks.one_of(c.accountant, ACCOUNTANTS, f"{key}accountant")
  for name in ("noise_multiplier", "target_epsilon"):
    value = c[name]
    checks.require(math.isfinite(value) and value >= 0,
                   f"{key}{name}={value} must be a finite number >= 0.")
  checks.require(math.isfinite(c.clip_norm) and c.clip_norm > 0,
                 f"{key}clip_norm={c.clip_norm} must be > 0: the L2 norm "
                 "each example's gradient is clipped to (e.g. 1.0).")
  checks.require(0 < c.delta < 1,
                 f"{key}delta={c.delta} must be in (0, 1); use less than 1 / "
                 "(training examples), e.g. 1e-5.")


def _example_grads(loss_fn: Callable, params, graphdef, batch: dict,
                   key: jax.Array):
  """((loss_B, metrics_B), grads_B): the loss of each example alone (a
  batch of one) and its gradient, for every row of `batch`."""
  rows = next(iter(batch.values())).shape[0]
  keys = jax.random.split(key, rows)

  def one(example, k):
    single = jax.tree.map(lambda x: x[None], example)
    return jax.value_and_grad(
        lambda p: loss_fn(nnx.merge(graphdef, p), single, k),
        has_aux=True)(params)

  rules = rules_lib.current()
  # Inside, each example is a batch of one: nothing to split. Outside, the
  # vmapped example axis is split as the batch is.
  with rules_lib.use(dataclasses.replace(rules, batch=None)):
    return jax.vmap(one, spmd_axis_name=rules_lib.axis_names(rules.batch))(
        batch, keys)


def clip(grads_B, clip_norm: float):
  """(each example's gradient scaled to L2 norm <= clip_norm, the norms
  before: B). The norm is over all of an example's parameters together."""
  sq = [jnp.sum(jnp.square(g.astype(jnp.float32)),
                axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads_B)]
  norms_B = jnp.sqrt(sum(sq))
  scale_B = jnp.minimum(1.0, clip_norm / jnp.maximum(norms_B, 1e-30))
  clipped = jax.tree.map(
      lambda g: g * scale_B.reshape(-1, *[1] * (g.ndim - 1)).astype(g.dtype),
      grads_B)
  return clipped, norms_B


def clipped_sum(loss_fn: Callable, params, graphdef, batch: dict,
                key: jax.Array, clip_norm: float):
  """(sums of the real rows' losses, metrics, count and clipped count, the
  sum of their clipped gradients). `batch["mask"]` (1 real, 0 padding)
  when Poisson-sampled; without it every row is real."""
  mask_B = batch.get("mask")
  inputs = {k: v for k, v in batch.items() if k != "mask"}
  (loss_B, metrics_B), grads_B = _example_grads(loss_fn, params, graphdef,
                                                inputs, key)
  if mask_B is None:
    mask_B = jnp.ones(loss_B.shape, jnp.float32)
  mask_B = constrain(mask_B.astype(jnp.float32), "batch")
  clipped_B, norms_B = clip(grads_B, clip_norm)
  summed = jax.tree.map(lambda g: jnp.tensordot(mask_B.astype(g.dtype), g, 1),
                        clipped_B)
  sums = {"loss": jnp.sum(mask_B * loss_B),
          **{k: jnp.sum(mask_B * v) for k, v in metrics_B.items()},
          "sampled": jnp.sum(mask_B),
          "clipped": jnp.sum(mask_B * (norms_B > clip_norm))}
  return sums, summed


def gaussian_noise(key: jax.Array, like, std: float, shardings=None):
  """N(0, std^2) of every leaf's global shape, one key per leaf; placed
  with `shardings` (the parameters'), the values do not depend on them."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, len(leaves))
  noise = [jax.random.normal(k, x.shape, jnp.float32) * std
           for k, x in zip(keys, leaves)]
  noise = jax.tree.unflatten(treedef, noise)
  if shardings is not None:
    noise = jax.lax.with_sharding_constraint(noise, shardings)
  return noise


def noisy_grads(loss_fn: Callable, params, graphdef, batch: dict,
                key: jax.Array, noise: Noise, accum_steps: int = 1,
                shardings=None):
  """((loss, metrics), the private gradient) of one step: clipped sums over
  `accum_steps` strided microbatches (as lm/train/step.py splits them),
  then one noise draw for the whole global batch. The loss and metrics are
  means over the real rows; "sampled" is how many there were and
  "clipped_fraction" the fraction of them whose norm exceeded the clip."""
  noise_key, key = jax.random.split(key)
  if accum_steps == 1:
    sums, summed = clipped_sum(loss_fn, params, graphdef, batch, key,
                               noise.clip_norm)
  else:
    def body(carry, xs):
      i, micro = xs
      micro = {k: constrain(v, "batch", *([None] * (v.ndim - 1)))
               for k, v in micro.items()}
      out = clipped_sum(loss_fn, params, graphdef, micro,
                        jax.random.fold_in(key, i), noise.clip_norm)
      return jax.tree.map(jnp.add, carry, out), None

    def split(x):  # Rows i, i+A, ...: as step._microbatches.
      x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
      return x.swapaxes(0, 1)

    micro = jax.tree.map(split, batch)
    shapes = jax.eval_shape(
        lambda m: clipped_sum(loss_fn, params, graphdef, m, key,
                              noise.clip_norm),
        jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (sums, summed), _ = jax.lax.scan(
        body, zeros, (jnp.arange(accum_steps), micro))
  noise_tree = gaussian_noise(noise_key, summed, noise.std, shardings)
  grads = jax.tree.map(
      lambda s, z: ((s + z) / noise.expected_batch).astype(s.dtype),
      summed, noise_tree)
  count = jnp.maximum(sums["sampled"], 1.0)
  metrics = {k: v / count for k, v in sums.items()
             if k not in ("loss", "sampled", "clipped")}
  metrics.update(sampled=sums["sampled"],
                 clipped_fraction=sums["clipped"] / count)
  return (sums["loss"] / count, metrics), grads
