"""Attention maps: each layer's and head's softmax(q k^T / sqrt(K) + mask).

Training never materializes these probabilities (the chunked attention keeps
a log-sum-exp instead, lm/models/attention.py), so they are recomputed here
from the q and k each layer projects in a forward pass (forward.py): after
RoPE, in the compute dtype, as the layer's attention reads them; scores and
softmax in float32, as every attention implementation takes them. The mask
is the model's: causal for the LM (`config.model.causal`), none for the
encoder classifier, and same-segment for packed documents. Grouped-query
attention: query head h reads kv head h // (H / N), as jax.nn does.

Shapes: B batch, L queries, S keys, H query heads, N kv heads, K head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.explain import forward
from lm.models import attention


def probabilities(q_BxLxHxK: jax.Array, k_BxSxNxK: jax.Array, *,
                  causal: bool, segment_ids_BxL=None) -> jax.Array:
  """float32 probs B x H x L x S: row (b, h, l) is query l's distribution
  over the keys (self-attention: S == L)."""
  H, K = q_BxLxHxK.shape[2], q_BxLxHxK.shape[3]
  L, S, N = q_BxLxHxK.shape[1], k_BxSxNxK.shape[1], k_BxSxNxK.shape[2]
  k_BxSxHxK = jnp.repeat(k_BxSxNxK, H // N, axis=2)
  scores_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK,
                              preferred_element_type=jnp.float32) * K ** -0.5
  mask_Bx1xLxS = jnp.ones((1, 1, L, S), bool)
  if causal:
    mask_Bx1xLxS = jnp.tril(mask_Bx1xLxS)
  if segment_ids_BxL is not None:
    mask_Bx1xLxS = mask_Bx1xLxS & attention.segment_mask(segment_ids_BxL,
                                                         segment_ids_BxL)
  # Every query sees itself (same segment, not later): no row is all -inf.
  scores_BxHxLxS = jnp.where(mask_Bx1xLxS, scores_BxHxLxS, -jnp.inf)
  return jax.nn.softmax(scores_BxHxLxS, axis=-1)


def maps(model, tokens_BxL: jax.Array, segment_ids_BxL=None,
         positions_BxL=None) -> list[jax.Array]:
  """Every layer's float32 probs B x H x L x L for `tokens_BxL`, first layer
  first; `model` is a transformer family's model (the LM or the encoder
  classifier: both hold a `transformer`)."""
  transformer = model.transformer
  x_BxLxD = transformer.embed(tokens_BxL)
  _, qk = forward.run(transformer, x_BxLxD, positions_BxL, segment_ids_BxL)
  return [probabilities(q, k, causal=transformer.cfg.causal,
                        segment_ids_BxL=segment_ids_BxL) for q, k in qk]
