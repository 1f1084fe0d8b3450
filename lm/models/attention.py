"""Attention cores: q, k, v (after projection and RoPE) -> per-head outputs.

`config.model.attention_impl` picks one:

  chunked  ours, in plain jnp, every backend. The queries are cut into
           `config.model.attention_chunks` chunks and each chunk attends only
           to the keys up to its own end, so causal attention skips the
           all-masked blocks above the diagonal (2 chunks: 3/4 of the score
           matrix; 4 chunks: 5/8). Its backward pass recomputes the
           probabilities from the saved log-sum-exp, as FlashAttention does,
           instead of keeping the B x H x L x S probabilities alive from the
           forward pass; the softmax backward needs only rowsum(dO * O).
           Measured on XLA:CPU at the reference shapes: see README
           "Performance log".
  xla      jax.nn.dot_product_attention's XLA lowering.
  cudnn    jax.nn.dot_product_attention's cuDNN flash attention (GPU only).

Every implementation takes scores and softmax in float32 and gives the same
outputs and gradients in float32 (tests/test_perf_options.py). Decoding with
a KV cache passes an explicit mask; that path is jax.nn's for every choice.

Shapes: B batch, L queries, S keys, H query heads, N kv heads (H = N x G:
query head h reads kv head h // G, as jax.nn does), K head dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Implementation -> the backends that can run it.
BACKENDS = {"chunked": ("cpu", "gpu", "tpu"), "xla": ("cpu", "gpu", "tpu"),
            "cudnn": ("gpu",)}


def attend(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, *, causal: bool, impl: str,
           chunks: int = 1, mask=None):
  """softmax(q k^T / sqrt(K)) v per head, with a causal or an explicit mask."""
  dtype = q_BxLxHxK.dtype
  if dtype == jnp.float16 and jax.default_backend() == "cpu":
    # float16 on XLA:CPU: jax asks for the F16_F16_F32 dot algorithm, which
    # the CPU backend cannot run in the backward pass; compute from float32
    # copies instead (same math, CPU only; GPUs run the float16 path).
    q_BxLxHxK, k_BxSxNxK, v_BxSxNxK = (
        t.astype(jnp.float32) for t in (q_BxLxHxK, k_BxSxNxK, v_BxSxNxK))
  if impl == "chunked" and mask is None:
    out_BxLxHxK = _chunked(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, causal, chunks)
  else:
    out_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, is_causal=causal and mask is None,
        mask=mask, implementation="xla" if impl == "chunked" else impl)
  return out_BxLxHxK.astype(dtype)


def _chunked(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, causal: bool, chunks: int):
  B, L, H, K = q_BxLxHxK.shape
  N = k_BxSxNxK.shape[2]
  q_BxLxNxGxK = q_BxLxHxK.reshape(B, L, N, H // N, K)
  if not causal:
    out = _attend_chunk(q_BxLxNxGxK, k_BxSxNxK, v_BxSxNxK, None)
    return out.reshape(B, L, H, K)
  assert k_BxSxNxK.shape[1] == L, "causal chunked attention needs S == L"
  chunks = max(1, min(chunks, L))
  ends = [L * (i + 1) // chunks for i in range(chunks)]
  outs, start = [], 0
  for end in ends:
    # Queries [start, end) see keys [0, end): the keys after `end` are
    # masked for every query of the chunk, so they are not computed at all.
    outs.append(_attend_chunk(q_BxLxNxGxK[:, start:end], k_BxSxNxK[:, :end],
                              v_BxSxNxK[:, :end], start))
    start = end
  return jnp.concatenate(outs, axis=1).reshape(B, L, H, K)


def _scores(q_BxCxNxGxK, k_BxSxNxK, offset):
  """float32 scaled scores; causal (query i at position offset + i) unless
  offset is None."""
  C, S, K = q_BxCxNxGxK.shape[1], k_BxSxNxK.shape[1], q_BxCxNxGxK.shape[-1]
  s_BxNxGxCxS = jnp.einsum("bcngk,bsnk->bngcs", q_BxCxNxGxK, k_BxSxNxK,
                           preferred_element_type=jnp.float32) * K ** -0.5
  if offset is None:
    return s_BxNxGxCxS
  mask_CxS = jnp.arange(S)[None, :] <= (offset + jnp.arange(C))[:, None]
  return jnp.where(mask_CxS, s_BxNxGxCxS, -jnp.inf)


def _forward(q_BxCxNxGxK, k_BxSxNxK, v_BxSxNxK, offset):
  s_BxNxGxCxS = _scores(q_BxCxNxGxK, k_BxSxNxK, offset)
  max_BxNxGxCx1 = jnp.max(s_BxNxGxCxS, axis=-1, keepdims=True)
  p_BxNxGxCxS = jnp.exp(s_BxNxGxCxS - max_BxNxGxCx1)
  sum_BxNxGxCx1 = jnp.sum(p_BxNxGxCxS, axis=-1, keepdims=True)
  # Normalize after the p.v product: a pass over B x C x H x K, not over
  # the B x H x C x S probabilities.
  o_BxCxNxGxK = jnp.einsum("bngcs,bsnk->bcngk",
                           p_BxNxGxCxS.astype(v_BxSxNxK.dtype), v_BxSxNxK,
                           preferred_element_type=jnp.float32)
  o_BxCxNxGxK = o_BxCxNxGxK / jnp.moveaxis(sum_BxNxGxCx1, 3, 1)
  lse_BxNxGxCx1 = max_BxNxGxCx1 + jnp.log(sum_BxNxGxCx1)
  return o_BxCxNxGxK.astype(q_BxCxNxGxK.dtype), lse_BxNxGxCx1


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attend_chunk(q_BxCxNxGxK, k_BxSxNxK, v_BxSxNxK, offset):
  return _forward(q_BxCxNxGxK, k_BxSxNxK, v_BxSxNxK, offset)[0]


def _attend_chunk_fwd(q_BxCxNxGxK, k_BxSxNxK, v_BxSxNxK, offset):
  o_BxCxNxGxK, lse_BxNxGxCx1 = _forward(q_BxCxNxGxK, k_BxSxNxK, v_BxSxNxK,
                                        offset)
  return o_BxCxNxGxK, (q_BxCxNxGxK, k_BxSxNxK, v_BxSxNxK, o_BxCxNxGxK,
                       lse_BxNxGxCx1)


def _attend_chunk_bwd(offset, residuals, do_BxCxNxGxK):
  q, k, v, o, lse_BxNxGxCx1 = residuals
  dtype = q.dtype
  p_BxNxGxCxS = jnp.exp(_scores(q, k, offset) - lse_BxNxGxCx1)
  dv_BxSxNxK = jnp.einsum("bngcs,bcngk->bsnk", p_BxNxGxCxS.astype(dtype),
                          do_BxCxNxGxK.astype(dtype))
  dp_BxNxGxCxS = jnp.einsum("bcngk,bsnk->bngcs", do_BxCxNxGxK.astype(dtype), v,
                            preferred_element_type=jnp.float32)
  # Softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) =
  # rowsum(dO * O), a sum over K instead of over S.
  rowsum_BxCxNxGx1 = jnp.sum(do_BxCxNxGxK.astype(jnp.float32)
                             * o.astype(jnp.float32), axis=-1, keepdims=True)
  ds_BxNxGxCxS = (p_BxNxGxCxS * (dp_BxNxGxCxS
                                 - jnp.moveaxis(rowsum_BxCxNxGx1, 1, 3))
                  * q.shape[-1] ** -0.5).astype(dtype)
  dq_BxCxNxGxK = jnp.einsum("bngcs,bsnk->bcngk", ds_BxNxGxCxS, k)
  dk_BxSxNxK = jnp.einsum("bngcs,bcngk->bsnk", ds_BxNxGxCxS, q)
  return dq_BxCxNxGxK, dk_BxSxNxK, dv_BxSxNxK


_attend_chunk.defvjp(_attend_chunk_fwd, _attend_chunk_bwd)
