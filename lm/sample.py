"""Autoregressive sampling with a KV cache: one prefill of the prompt, then one
token per step inside a single jitted `lax.scan`.

Sampling: temperature 0 is greedy; otherwise top-k then top-p (nucleus)
filtering of the float32 logits, then a categorical draw.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def filter_logits(logits_BxV: jax.Array, *, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k / top-p set to -inf."""
  neg_inf = jnp.finfo(logits_BxV.dtype).min
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, neg_inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1,
                        keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_B1, neg_inf, logits_BxV)
  return logits_BxV


def choose(logits_BxV, key, *, temperature: float, top_k: int, top_p: float):
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV / temperature, top_k=top_k,
                             top_p=top_p)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def filter_rows(logits_BxV: jax.Array, top_k_B: jax.Array,
                top_p_B: jax.Array) -> jax.Array:
  """filter_logits with each row's own top_k (0 = all) and top_p (1 = all),
  as traced arrays: one compiled step serves a server's slots whatever
  each request asked for. Keeps the same tokens as filter_logits."""
  V = logits_BxV.shape[-1]
  neg_inf = jnp.finfo(logits_BxV.dtype).min
  sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # Descending.
  rank_V = jnp.arange(V)
  k_B1 = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)[:, None]
  in_top_k_BxV = rank_V < k_B1
  # Nucleus over the top-k survivors, as filter_logits applies top_p after
  # top_k; top_p >= 1 keeps every survivor (no rounding of the mass).
  probs_BxV = jax.nn.softmax(jnp.where(in_top_k_BxV, sorted_BxV, neg_inf),
                             axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  keep_BxV = in_top_k_BxV & ((mass_before_BxV < top_p_B[:, None])
                             | (top_p_B[:, None] >= 1.0))
  cutoff_B1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1,
                      keepdims=True)
  return jnp.where(logits_BxV < cutoff_B1, neg_inf, logits_BxV)


def choose_rows(logits_BxV, keys_B, temperature_B, top_k_B, top_p_B):
  """`choose` with per-row settings and keys: greedy where the row's
  temperature is 0 (the argmax of the raw logits, as `choose`), else a draw
  from its tempered, filtered logits with its own key."""
  tempered_BxV = logits_BxV / jnp.where(temperature_B > 0, temperature_B,
                                        1.0)[:, None]
  filtered_BxV = filter_rows(tempered_BxV, top_k_B, top_p_B)
  drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV)
  greedy_B = jnp.argmax(logits_BxV, axis=-1)
  return jnp.where(temperature_B > 0, drawn_B, greedy_B).astype(jnp.int32)


def generate(graphdef, params, prompt_BxP: jax.Array, key: jax.Array, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0) -> jax.Array:
  """Returns the B x max_new_tokens continuation of the prompts."""
  model = nnx.merge(graphdef, params)
  B, P = prompt_BxP.shape
  cache = model.init_cache(B, P + max_new_tokens)
  pick = functools.partial(choose, temperature=temperature, top_k=top_k,
                           top_p=top_p)
  logits_BxPxV, cache = model(prompt_BxP, cache=cache, cache_index=0)
  keys = jax.random.split(key, max_new_tokens)
  first_B = pick(logits_BxPxV[:, -1], keys[0])

  def step(carry, key_i):
    token_B, cache, index = carry
    logits_Bx1xV, cache = model(token_B[:, None], cache=cache,
                                cache_index=index)
    next_B = pick(logits_Bx1xV[:, 0], key_i)
    return (next_B, cache, index + 1), token_B

  (last_B, _, _), tokens_NxB = jax.lax.scan(step, (first_B, cache, P),
                                            keys[1:])
  return jnp.concatenate([tokens_NxB.T, last_B[:, None]], axis=1)
