"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

Schedule: each pruned parameter's target sparsity rises from s_i at
`begin_step` (t0) to s_f at `end_step` (t_end) along a cubic,

  s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))**3,

pruning fast while there are many weights to spare and slowing near the
target. After t_end the masks freeze and training fine-tunes the survivors.

`magnitude_prune` is the LAST element of an optax chain, so its updates are
final deltas. Every `update_every` steps in [t0, t_end], and at t_end itself,
it zeroes the round(s_t * size) smallest |params + updates| of each pruned
parameter, and rewrites the updates so params + updates is exactly 0.0 under
the mask: checkpoints hold sparse parameters, and `layer_sparsity` reads them.

Pruned: parameters whose '/'-joined path ("transformer/blocks/0/mlp/up/kernel")
fully matches one of `layers`; with no `layers`, every parameter with ndim >= 2
(biases and norm scales stay dense). Suffix _P: a parameter's flattened size.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lm import checks


class PruneState(NamedTuple):
  """`masks`: a bool array (True = kept) shaped like each parameter, unpruned
  ones too (all True, never read). The trainer's `optax.tree_map_params` (no
  `is_leaf`) gives every mask leaf its parameter's sharding, and cheaper
  placeholders fail: None or optax.MaskedNode break the tree structure, orbax
  refuses size-0 arrays, a (1,)*ndim array is not divisible by the sharding.
  Cost: a byte per unpruned entry (only vectors by default)."""
  count: jax.Array  # int32 scalar: updates applied so far (= the train step).
  masks: Any


def _path_str(path) -> str:
  # "blocks/0/mlp/kernel": nnx pure dicts key list entries with ints.
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_pruned(path: str, leaf, layers: tuple[str, ...]) -> bool:
  if layers:
    return any(re.fullmatch(p, path) for p in layers)
  return len(getattr(leaf, "shape", ())) >= 2


def _pruned_leaves(params, layers: tuple[str, ...]) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  named = ((_path_str(path), leaf) for path, leaf in flat)
  return [(s, leaf) for s, leaf in named if _is_pruned(s, leaf, layers)]


def check_patterns(layers: tuple[str, ...], params_or_shapes: Any) -> None:
  """Raises if a pattern of config.prune.layers matches no parameter path."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params_or_shapes)
  paths = [_path_str(path) for path, _ in flat]
  for pattern in layers:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise checks.ConfigError(f"config.prune.layers: {pattern!r} is not a "
                               f"valid regular expression ({e}).") from e
    if not any(regex.fullmatch(p) for p in paths):
      raise checks.ConfigError(
          f"config.prune.layers: pattern {pattern!r} matches no parameter; it "
          f"must match a whole '/'-joined path, e.g. one of {paths[:6]}.")


def _check_args(final_sparsity, begin_step, end_step, update_every) -> None:
  if not 0.0 <= final_sparsity < 1.0:
    raise checks.ConfigError(
        f"config.prune.sparsity={final_sparsity} must be in [0, 1): the "
        "fraction of each pruned parameter zeroed.")
  if update_every < 1:
    raise checks.ConfigError(
        f"config.prune.update_every={update_every} must be >= 1.")
  if end_step < begin_step:
    raise checks.ConfigError(
        f"config.prune.end_step={end_step} is before begin_step={begin_step};"
        " raise end_step or lower begin_step.")


def target_sparsity(step, *, final_sparsity: float, begin_step: int,
                    end_step: int, initial_sparsity: float = 0.0) -> jax.Array:
  """The cubic schedule above; `step` may be a traced int32."""
  step = jnp.asarray(step)
  # max(.., 1): with begin == end the ramp is a single jump to s_f.
  progress = jnp.clip((step - begin_step) / max(end_step - begin_step, 1),
                      0.0, 1.0)
  s = final_sparsity + (initial_sparsity - final_sparsity) * (1 - progress)**3
  s = jnp.where(step >= end_step, final_sparsity, s)
  return jnp.where(step < begin_step, initial_sparsity, s).astype(jnp.float32)


def _prune_smallest(w, mask, sparsity):
  """Zeroes the round(sparsity * size) smallest |w|. Entries already pruned
  score -1 so they rank first: a mask only ever loses ones. The stable sort
  makes ties deterministic, so the count is exact."""
  score_P = jnp.where(mask, jnp.abs(w), -1.0).ravel()
  n = score_P.size
  k = jnp.round(sparsity * n).astype(jnp.int32)
  order_P = jnp.argsort(score_P, stable=True)
  keep_P = jnp.zeros(n, bool).at[order_P].set(jnp.arange(n) >= k)
  return keep_P.reshape(w.shape)


def magnitude_prune(final_sparsity: float, *, begin_step: int, end_step: int,
                    update_every: int, layers: tuple[str, ...] = ()
                    ) -> optax.GradientTransformation:
  """Pruning as the last element of an optax chain (see the module doc)."""
  _check_args(final_sparsity, begin_step, end_step, update_every)
  layers = tuple(layers)
  pruned = lambda path, leaf: _is_pruned(_path_str(path), leaf, layers)

  def init(params):
    # optax.tree_map_params calls init on a leafless placeholder: skip checks.
    if layers and jax.tree.leaves(params):
      check_patterns(layers, params)
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    return PruneState(jnp.zeros([], jnp.int32), masks)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("magnitude_prune ranks weights: pass params to update.")
    count = state.count
    due = ((count >= begin_step) & (count <= end_step) &
           (((count - begin_step) % update_every == 0) | (count == end_step)))
    sparsity = target_sparsity(count, final_sparsity=final_sparsity,
                               begin_step=begin_step, end_step=end_step)
    new = jax.tree.map(lambda p, u: p + u, params, updates)

    def recompute(masks):
      return jax.tree_util.tree_map_with_path(
          lambda path, m, w: _prune_smallest(w, m, sparsity)
          if pruned(path, w) else m, masks, new)

    # cond, not where: the sorts run only on the steps that need them.
    masks = jax.lax.cond(due, recompute, lambda m: m, state.masks)
    # -p where pruned makes p + update exactly 0.0; kept entries keep u as is.
    updates = jax.tree_util.tree_map_with_path(
        lambda path, u, m, p: jnp.where(m, u, -p).astype(u.dtype)
        if pruned(path, p) else u, updates, masks, params)
    return updates, PruneState(optax.safe_increment(count), masks)

  return optax.GradientTransformation(init, update)


def _end_step(prune_cfg, total_steps: int) -> int:
  # 0: the last quarter of training fine-tunes at the final sparsity.
  return int(prune_cfg.end_step) or int(0.75 * total_steps)


def check(prune_cfg, total_steps: int) -> None:
  """config.prune's values (its layer patterns need the model: see
  `check_patterns`). Raises ConfigError."""
  if prune_cfg.sparsity:
    _check_args(float(prune_cfg.sparsity), int(prune_cfg.begin_step),
                _end_step(prune_cfg, total_steps),
                int(prune_cfg.update_every))


def from_config(prune_cfg, total_steps: int
                ) -> optax.GradientTransformation | None:
  """`prune_cfg` is config.prune; sparsity 0 turns pruning off."""
  if not prune_cfg.sparsity:
    return None
  return magnitude_prune(
      float(prune_cfg.sparsity), begin_step=int(prune_cfg.begin_step),
      end_step=_end_step(prune_cfg, total_steps),
      update_every=int(prune_cfg.update_every),
      layers=tuple(prune_cfg.layers))


def layer_sparsity(params, layers: tuple[str, ...] = ()) -> dict[str, float]:
  """Fraction of exactly-zero entries of each pruned parameter, by path."""
  return {path: int(jnp.sum(x == 0)) / x.size
          for path, x in _pruned_leaves(params, tuple(layers))}


def overall_sparsity(params, layers: tuple[str, ...] = ()) -> float:
  """Zeros over all pruned entries (0.0 if nothing is selected)."""
  leaves = _pruned_leaves(params, tuple(layers))
  total = sum(x.size for _, x in leaves)
  return sum(int(jnp.sum(x == 0)) for _, x in leaves) / total if total else 0.0
