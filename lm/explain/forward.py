"""The Transformer families' forward pass from input embeddings, one block
at a time, keeping each layer's attention queries and keys.

It calls the model's own modules (the blocks, `Attention.project`, the final
norm; the heads are `Model.logits` / `Model.classify`), so it computes what
`Model.__call__` computes (tests/explain/test_attention_maps.py checks the
logits are equal) but can start from any embeddings (integrated gradients
walks from a baseline to the text's) and hands back each layer's q and k.
Only lm/explain runs it; the training path is untouched.

Shapes: B batch, L length, D d_model, H query heads, N kv heads, K head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def blocks(transformer) -> list:
  """The Transformer's blocks in order, as separate modules (a scanned
  model's stacked layers sliced, as the pipeline slices them)."""
  if not transformer.cfg.scan_layers:
    return list(transformer.blocks)
  graphdef, stacked = nnx.split(transformer.blocks)
  return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
          for i in range(transformer.cfg.n_layers)]


def run(transformer, x_BxLxD: jax.Array, positions_BxL=None,
        segment_ids_BxL=None
        ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
  """(final hidden states B x L x D after the final norm, [(q B x L x H x K,
  k B x L x N x K) of each layer]) for input embeddings x_BxLxD, at
  positions 0..L-1 unless given (packed documents, `segment_ids_BxL`, come
  with positions that restart at each document, as in training)."""
  B, L = x_BxLxD.shape[:2]
  if positions_BxL is None:
    positions_BxL = jnp.broadcast_to(jnp.arange(L), (B, L))
  qk = []
  for block in blocks(transformer):
    q_BxLxHxK, k_BxLxNxK, _ = block.attn.project(block.attn_norm(x_BxLxD),
                                                 positions_BxL)
    qk.append((q_BxLxHxK, k_BxLxNxK))
    x_BxLxD, _, _ = block(x_BxLxD, positions_BxL,
                          segment_ids_BxL=segment_ids_BxL)
  return transformer.final_norm(x_BxLxD), qk
