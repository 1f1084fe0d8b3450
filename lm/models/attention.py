"""Attention cores: q, k, v (after projection and RoPE) -> per-head outputs.

`config.model.attention_impl` picks one:

  auto     (the default) cudnn where it runs: on a GPU, in bfloat16 or
           float16, head dim a multiple of 8 up to 128, without segment
           ids or an explicit mask; chunked everywhere else (every CPU and
           TPU program is chunked's). Resolved at trace time (`resolve`).
  chunked  ours, in plain jnp, every backend. The queries are cut into
           `config.model.attention_chunks` chunks and each chunk attends only
           to the keys up to its own end, so causal attention skips the
           all-masked blocks above the diagonal (2 chunks: 3/4 of the score
           matrix; 4 chunks: 5/8). Its backward pass recomputes the
           probabilities from the saved log-sum-exp, as FlashAttention does,
           instead of keeping the B x H x L x S probabilities alive from the
           forward pass; the softmax backward needs only rowsum(dO * O).
           Measured on XLA:CPU at the reference shapes: docs/performance.md.
  xla      jax.nn.dot_product_attention's XLA lowering.
  cudnn    jax.nn.dot_product_attention's cuDNN flash attention (GPU only).

Every implementation takes scores and softmax in float32 and gives the same
outputs and gradients in float32 (tests/models/test_perf_options.py).
Decoding with a KV cache passes an explicit mask; that path is jax.nn's for
every choice.

Segment ids (packed documents): `segment_ids_BxL` (int32) lets one row hold
several documents. A query attends to a key only if both have the same id
(and, when causal, the key is not later than the query); documents are 1..n
and padding is 0, just another segment, so every row sees at least itself
and nothing is NaN. `chunked` adds the same-segment mask to its scores
inside the custom VJP (forward and the backward's recomputed
probabilities), keeping its skip of the keys after each chunk; `xla` passes
a B x 1 x L x S same-segment mask to jax.nn alongside `is_causal`. `cudnn`
refuses them (`supports_segments`, and a ValueError at trace time): jax.nn
would turn the mask into a dense additive B x 1 x L x S bias for cuDNN, which
we cannot test without a GPU. Without segment ids (None) every program is
the one it was. Context parallelism (lm/parallel/context.py) and the KV
cache (lm/models/transformer.py) honour them too; tests/models/
test_segments.py checks each packed document against itself run alone.

Shapes: B batch, L queries, S keys, H query heads, N kv heads (H = N x G:
query head h reads kv head h // G, as jax.nn does), K head dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lm import backend as backend_lib
from lm.models import tuning

# Implementation -> the backends that can run it.
BACKENDS = {"auto": ("cpu", "gpu", "tpu"), "chunked": ("cpu", "gpu", "tpu"),
            "xla": ("cpu", "gpu", "tpu"), "cudnn": ("gpu",)}
# The implementations that honour segment ids (see above); auto does by
# choosing chunked for them.
SEGMENTS = ("auto", "chunked", "xla")


def resolve(impl: str, dtype, head_dim: int, masked: bool) -> str:
  """The implementation `impl` runs as: itself, or auto's choice for this
  backend, dtype, head dim and whether a mask or segment ids apply. cuDNN's
  flash attention ran the 1b preset's step on an H200 in about half of
  chunked's time (docs/performance.md, "One GPU"); it takes only 16-bit
  inputs and head dims up to 128."""
  if impl != "auto":
    return impl
  cudnn_runs = (backend_lib.name() == "gpu" and not masked
                and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if cudnn_runs else "chunked"


def supports_segments(impl: str) -> bool:
  """Whether `impl` can attend with segment ids (packed documents)."""
  return impl in SEGMENTS


def check_segments(impl: str) -> None:
  """A clear error, at trace time, for segment ids `impl` cannot honour."""
  if not supports_segments(impl):
    raise ValueError(f"attention_impl={impl!r} cannot honour segment ids "
                     f"(packed documents); use one of {SEGMENTS}.")


def segment_mask(q_segment_ids_BxL, k_segment_ids_BxS):
  """B x 1 x L x S: True where query and key are in the same segment."""
  return (q_segment_ids_BxL[:, None, :, None]
          == k_segment_ids_BxS[:, None, None, :])


def attend(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, *, causal: bool, impl: str,
           chunks: int = 1, mask=None, segment_ids_BxL=None):
  """softmax(q k^T / sqrt(K)) v per head, with a causal or an explicit mask,
  and (self-attention, S == L) only within segments when segment_ids_BxL is
  given."""
  dtype = q_BxLxHxK.dtype
  impl = resolve(impl, dtype, q_BxLxHxK.shape[-1],
                 masked=mask is not None or segment_ids_BxL is not None)
  if segment_ids_BxL is not None:
    check_segments(impl)
    if mask is not None:
      raise ValueError("attend: pass segment ids or an explicit mask, not "
                       "both (fold the segments into the mask).")
  if dtype == jnp.float16 and backend_lib.name() == "cpu":
    # float16 on XLA:CPU: jax asks for the F16_F16_F32 dot algorithm, which
    # the CPU backend cannot run in the backward pass; compute from float32
    # copies instead (same math, CPU only; GPUs run the float16 path).
    q_BxLxHxK, k_BxSxNxK, v_BxSxNxK = (
        t.astype(jnp.float32) for t in (q_BxLxHxK, k_BxSxNxK, v_BxSxNxK))
  if impl == "chunked" and mask is None:
    out_BxLxHxK = _chunked(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, causal, chunks,
                           segment_ids_BxL)
  else:
    is_causal = causal and mask is None
    if segment_ids_BxL is not None:  # jax.nn ands it with is_causal's mask.
      mask = segment_mask(segment_ids_BxL, segment_ids_BxL)
    out_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, is_causal=is_causal, mask=mask,
        implementation="xla" if impl == "chunked" else impl)
  return out_BxLxHxK.astype(dtype)


# Jitted so that it is traced once per shape: the unrolled layers reuse that
# trace and its derivatives (jax caches them per jaxpr) instead of tracing
# the custom VJP again per layer (a quarter of the bench step's lowering).
@functools.partial(jax.jit, static_argnums=(3, 4))
def _chunked(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, causal: bool, chunks: int,
             segment_ids_BxL=None):
  B, L, H, K = q_BxLxHxK.shape
  N = k_BxSxNxK.shape[2]
  # Head-major inside: every einsum below is then a plain batched GEMM whose
  # output is already in the layout its consumer reads. With the sequence
  # axis outside the heads, XLA:CPU computed some score blocks transposed
  # and transposed them back inside the softmax fusions (measured 4-9%
  # slower, and 0.2 s more compile).
  q_BxNxGxLxK = q_BxLxHxK.reshape(B, L, N, H // N, K).transpose(0, 2, 3, 1, 4)
  k_BxNxSxK = k_BxSxNxK.transpose(0, 2, 1, 3)
  v_BxNxSxK = v_BxSxNxK.transpose(0, 2, 1, 3)
  seg_BxL = segment_ids_BxL
  if not causal:
    segments = None if seg_BxL is None else (seg_BxL, seg_BxL)
    out_BxNxGxLxK = _attend_chunk(q_BxNxGxLxK, k_BxNxSxK, v_BxNxSxK, None,
                                  segments)
  else:
    assert k_BxSxNxK.shape[1] == L, "causal chunked attention needs S == L"
    chunks = max(1, min(chunks, L))
    outs, start = [], 0
    for end in [L * (i + 1) // chunks for i in range(chunks)]:
      # Queries [start, end) see keys [0, end): the keys after `end` are
      # masked for every query of the chunk, so they are not computed.
      segments = (None if seg_BxL is None
                  else (seg_BxL[:, start:end], seg_BxL[:, :end]))
      outs.append(_attend_chunk(q_BxNxGxLxK[:, :, :, start:end],
                                k_BxNxSxK[:, :, :end], v_BxNxSxK[:, :, :end],
                                start, segments))
      start = end
    out_BxNxGxLxK = jnp.concatenate(outs, axis=3)
  return out_BxNxGxLxK.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


def _scores(q_BxNxGxCxK, k_BxNxSxK, offset, segments):
  """float32 scaled scores; causal (query i at position offset + i) unless
  offset is None; within segments unless segments (the queries' B x C and
  the keys' B x S ids) is None."""
  C, S, K = q_BxNxGxCxK.shape[3], k_BxNxSxK.shape[2], q_BxNxGxCxK.shape[-1]
  s_BxNxGxCxS = jnp.einsum("bngck,bnsk->bngcs", q_BxNxGxCxK, k_BxNxSxK,
                           preferred_element_type=jnp.float32) * K ** -0.5
  mask = None  # C x S, or B x 1 x 1 x C x S with segments.
  if offset is not None:
    mask = jnp.arange(S)[None, :] <= (offset + jnp.arange(C))[:, None]
  if segments is not None:
    # Query and key in the same segment; B x 1 x 1 x C x S.
    same_Bx1x1xCxS = segment_mask(*segments)[:, :, None]
    mask = same_Bx1x1xCxS if mask is None else mask & same_Bx1x1xCxS
  if mask is None:
    return s_BxNxGxCxS
  # No row is all -inf: every query sees itself (same segment, not later).
  return jnp.where(mask, s_BxNxGxCxS, -jnp.inf)


def _forward(q_BxNxGxCxK, k_BxNxSxK, v_BxNxSxK, offset, segments):
  s_BxNxGxCxS = _scores(q_BxNxGxCxK, k_BxNxSxK, offset, segments)
  max_BxNxGxCx1 = jnp.max(s_BxNxGxCxS, axis=-1, keepdims=True)
  p_BxNxGxCxS = jnp.exp(s_BxNxGxCxS - max_BxNxGxCx1)
  sum_BxNxGxCx1 = jnp.sum(p_BxNxGxCxS, axis=-1, keepdims=True)
  # Normalize after the p.v product: a pass over C x K per head, not over
  # the C x S probabilities.
  o_BxNxGxCxK = jnp.einsum("bngcs,bnsk->bngck",
                           p_BxNxGxCxS.astype(v_BxNxSxK.dtype), v_BxNxSxK,
                           preferred_element_type=jnp.float32) / sum_BxNxGxCx1
  lse_BxNxGxCx1 = max_BxNxGxCx1 + jnp.log(sum_BxNxGxCx1)
  return o_BxNxGxCxK.astype(q_BxNxGxCxK.dtype), lse_BxNxGxCx1


# `segments` (None, or the int32 ids of the chunk's queries and of its keys)
# is an ordinary argument, not a nondiff one: it holds traced arrays. Its
# cotangent is None (zero), as jax allows for integer inputs.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attend_chunk(q_BxNxGxCxK, k_BxNxSxK, v_BxNxSxK, offset, segments):
  return _forward(q_BxNxGxCxK, k_BxNxSxK, v_BxNxSxK, offset, segments)[0]


def _attend_chunk_fwd(q_BxNxGxCxK, k_BxNxSxK, v_BxNxSxK, offset, segments):
  o_BxNxGxCxK, lse_BxNxGxCx1 = _forward(q_BxNxGxCxK, k_BxNxSxK, v_BxNxSxK,
                                        offset, segments)
  return o_BxNxGxCxK, (q_BxNxGxCxK, k_BxNxSxK, v_BxNxSxK, o_BxNxGxCxK,
                       lse_BxNxGxCx1, segments)


def _attend_chunk_bwd(offset, residuals, do_BxNxGxCxK):
  q, k, v, o, lse_BxNxGxCx1, segments = residuals
  dtype = q.dtype
  do_BxNxGxCxK = do_BxNxGxCxK.astype(dtype)
  p_BxNxGxCxS = jnp.exp(_scores(q, k, offset, segments) - lse_BxNxGxCx1)
  dv_BxNxSxK = tuning.accumulate_einsum(
      "bngcs,bngck->bnsk", p_BxNxGxCxS.astype(dtype), do_BxNxGxCxK)
  dp_BxNxGxCxS = jnp.einsum("bngck,bnsk->bngcs", do_BxNxGxCxK, v,
                            preferred_element_type=jnp.float32)
  # Softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) =
  # rowsum(dO * O), a sum over K instead of over S.
  rowsum_BxNxGxCx1 = jnp.sum(do_BxNxGxCxK.astype(jnp.float32)
                             * o.astype(jnp.float32), axis=-1, keepdims=True)
  ds_BxNxGxCxS = (p_BxNxGxCxS * (dp_BxNxGxCxS - rowsum_BxNxGxCx1)
                  * q.shape[-1] ** -0.5).astype(dtype)
  dq_BxNxGxCxK = tuning.accumulate_einsum("bngcs,bnsk->bngck",
                                          ds_BxNxGxCxS, k)
  dk_BxNxSxK = tuning.accumulate_einsum("bngcs,bngck->bnsk",
                                        ds_BxNxGxCxS, q)
  return dq_BxNxGxCxK, dk_BxNxSxK, dv_BxNxSxK, None


_attend_chunk.defvjp(_attend_chunk_fwd, _attend_chunk_bwd)
