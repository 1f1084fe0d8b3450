"""Optimizers and learning-rate schedules from `config.optimizer`.

Every optimizer is the same chain, so clipping, weight decay and the schedule
behave identically whichever update rule is chosen:

  clip_by_global_norm -> update rule -> decoupled weight decay -> -lr * update
  [-> magnitude pruning, when config.prune.sparsity > 0]

Weight decay is masked off vectors (norm scales, biases): only parameters with
two or more dimensions decay, as in MaxText and big_vision.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lm import checks
from lm.train import prune

SCHEDULES = ("constant", "cosine", "linear")


def _adamw(c):
  return optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps)


def _adafactor(c):
  # Factored second moments (memory ~ rows + cols) with update clipping, as in
  # optax.adafactor and T5X; momentum off by default.
  return optax.chain(
      optax.scale_by_factored_rms(decay_rate=c.decay_rate),
      optax.clip_by_block_rms(c.clipping_threshold))


def _lion(c):
  return optax.scale_by_lion(b1=c.b1, b2=c.b2)


def _sgd(c):
  del c
  return optax.identity()


def _momentum(c):
  return optax.trace(decay=c.momentum, nesterov=c.nesterov)


def _adagrad(c):
  return optax.scale_by_rss(
      initial_accumulator_value=c.initial_accumulator_value, eps=c.eps)


UPDATE_RULES: dict[str, Callable] = {
    "adamw": _adamw,
    "adafactor": _adafactor,
    "lion": _lion,
    "sgd": _sgd,
    "momentum": _momentum,
    "adagrad": _adagrad,
}


def schedule(c, total_steps: int) -> optax.Schedule:
  """`c` is config.optimizer; decay runs to `total_steps`."""
  peak = c.learning_rate
  warmup = int(c.warmup_steps)
  name = c.schedule
  end = peak * c.end_learning_rate_fraction
  decay_steps = max(total_steps - warmup, 1)
  if name == "constant":
    after = optax.constant_schedule(peak)
  elif name == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak
                                        if peak else 0.0)
  elif name == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  else:
    raise ValueError(f"config.optimizer.schedule={name!r} is unknown; use one "
                     f"of {SCHEDULES}.")
  if warmup == 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm's rule (scale by max_norm / norm when the norm
  is larger), applied as one multiply by a scalar.

  optax divides every element by the norm. XLA does not duplicate a divide
  into several consumers, so that form materializes a clipped copy of each
  gradient before the optimizer's moment updates read it: one more kernel
  per parameter (about 30 of the bench step's, 0.1 s of its compile) and
  one more pass over every gradient. A multiply is fused into each
  consumer. The state is optax's (empty), so checkpoints are unchanged.
  """
  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.minimum(1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update_fn)


def decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def check(c, total_steps: int) -> None:
  """config.optimizer against a run of `total_steps` steps (its names and
  its numbers, before anything compiles). Raises ConfigError."""
  checks.one_of(c.name, UPDATE_RULES, "config.optimizer.name")
  checks.one_of(c.schedule, SCHEDULES, "config.optimizer.schedule")
  key = "config.optimizer."
  lr = c.learning_rate
  checks.require(math.isfinite(lr) and lr > 0,
                 f"{key}learning_rate={lr} must be a positive finite number "
                 "(the peak, after warmup), e.g. 1e-3.")
  checks.require(0 <= c.warmup_steps <= total_steps,
                 f"{key}warmup_steps={c.warmup_steps} must be >= 0 and at "
                 f"most config.train.steps={total_steps}; lower it too when "
                 "shortening a run.")
  checks.require(0 <= c.end_learning_rate_fraction <= 1,
                 f"{key}end_learning_rate_fraction="
                 f"{c.end_learning_rate_fraction} must be in [0, 1] (of the "
                 "peak learning rate).")
  for name, what in (("weight_decay", "0 = off"),
                     ("grad_clip_norm", "0 = no clipping")):
    value = c[name]
    checks.require(math.isfinite(value) and value >= 0,
                   f"{key}{name}={value} must be a finite number >= 0 "
                   f"({what}).")
  if c.name in ("adamw", "lion"):
    for name in ("b1", "b2"):
      checks.require(0 <= c[name] < 1, f"{key}{name}={c[name]} must be in "
                     f"[0, 1) for config.optimizer.name={c.name!r}.")
  if c.name in ("adamw", "adagrad"):
    checks.require(c.eps > 0, f"{key}eps={c.eps} must be > 0.")
  if c.name == "momentum":
    checks.require(0 <= c.momentum < 1, f"{key}momentum={c.momentum} must "
                   "be in [0, 1).")


def make(c, total_steps: int, prune_cfg
         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (optimizer, learning-rate schedule) for config.optimizer `c`;
  with `prune_cfg` (config.prune) asking for sparsity, magnitude pruning
  (lm/train/prune.py) is the chain's last step, so its masks live in the
  optimizer state and are checkpointed with it."""
  if c.name not in UPDATE_RULES:
    raise ValueError(f"config.optimizer.name={c.name!r} is unknown; use one of "
                     f"{sorted(UPDATE_RULES)}.")
  lr = schedule(c, total_steps)
  parts = []
  if c.grad_clip_norm:
    parts.append(clip_by_global_norm(c.grad_clip_norm))
  parts.append(UPDATE_RULES[c.name](c))
  if c.weight_decay:
    parts.append(optax.add_decayed_weights(c.weight_decay, mask=decay_mask))
  parts.append(optax.scale_by_learning_rate(lr))
  pruning = prune.from_config(prune_cfg, total_steps)
  if pruning is not None:
    parts.append(pruning)
  return optax.chain(*parts), lr
