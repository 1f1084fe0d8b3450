"""Context parallelism: attention with the length axis split over `sequence`.

Two implementations of the same math (`IMPLS`):
  ring        K/V blocks travel around the `sequence` ring (`ppermute`) while
              each device folds them into its queries with an online softmax;
              the backward pass is a second ring (`custom_vjp`), so no device
              ever holds more than two sequence shards of K/V.
  all_gather  every device gathers all of K and V: simple, but O(L) K/V
              and O(L^2 / n) scores per device; a baseline for tests and
              benchmarks.

The ring's scores are computed in tiles of (L / 2n) queries x at most
`KV_CHUNK` keys, so its per-device memory is O(L / n) in the sequence length.

The causal mask comes from the token positions (key position <= query
position), never from array indices, so any layout of the sequence over the
devices is correct. The contiguous layout gives device n-1 all of the causal
work; `zigzag_permutation` gives every device the same amount.

Segment ids (packed documents, lm/models/attention.py): a query sees a key
only if they have the same id (and, causal, the key's position is not
later). The keys' ids travel around the ring with K/V and their positions,
forward and backward; all_gather gathers them. The mask is still a function
of positions and ids, never of indices, so the zig-zag layout stays correct.
Without segment ids the programs are unchanged.

Letters: B batch, L length (query), S length (key), H query heads, N kv heads,
G = H // N query heads per kv head, K head dim, T and U half-shards of L and S
(U also a chunk of keys within one).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lm.parallel import mesh as mesh_lib

IMPLS = ("ring", "all_gather")
AXIS = "sequence"
# Masked scores: finite, so that a row with nothing visible yet in the online
# softmax gives exp(NEG - NEG) = 1 in its rescaling instead of NaN.
NEG = -1e30
# Keys per score tile in the ring. Bigger tiles are faster matmuls; smaller
# ones bound the (L / 2n) x KV_CHUNK float32 scores (and the backward's three
# more of that size) when the local shard is long.
KV_CHUNK = 512


def zigzag_permutation(length: int, n: int) -> np.ndarray:
  """Indices `perm` with x_zigzag = x[:, perm]: the sequence is cut into 2n
  equal chunks and device i's contiguous shard of the permuted sequence holds
  chunks i and 2n-1-i (load-balanced causal work). `np.argsort(perm)` undoes
  it."""
  if length % (2 * n):
    raise ValueError(f"length={length} must be a multiple of 2 * n = {2 * n}.")
  chunks = np.arange(length).reshape(2 * n, length // (2 * n))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]])
                         for i in range(n)])


def _visible(qpos_BxT, kpos_BxU, causal: bool, qseg_BxT=None, kseg_BxU=None):
  """B x 1 x 1 x T x U: which keys each query sees; None when it sees them
  all (not causal, no segment ids)."""
  mask_Bx1x1xTxU = None
  if causal:
    mask_Bx1x1xTxU = (kpos_BxU[:, None, None, None, :]
                      <= qpos_BxT[:, None, None, :, None])
  if qseg_BxT is not None:
    same_Bx1x1xTxU = (kseg_BxU[:, None, None, None, :]
                      == qseg_BxT[:, None, None, :, None])
    mask_Bx1x1xTxU = (same_Bx1x1xTxU if mask_Bx1x1xTxU is None
                      else mask_Bx1x1xTxU & same_Bx1x1xTxU)
  return mask_Bx1x1xTxU


def _scores(q_BxTxNxGxK, k_BxUxNxK, qpos_BxT, kpos_BxU, causal: bool,
            qseg_BxT=None, kseg_BxU=None):
  """Scaled float32 scores and the visibility mask (None when not causal and
  without segment ids)."""
  scale = q_BxTxNxGxK.shape[-1] ** -0.5
  s_BxNxGxTxU = jnp.einsum("btngk,bunk->bngtu", q_BxTxNxGxK, k_BxUxNxK,
                           preferred_element_type=jnp.float32) * scale
  mask_Bx1x1xTxU = _visible(qpos_BxT, kpos_BxU, causal, qseg_BxT, kseg_BxU)
  if mask_Bx1x1xTxU is None:
    return s_BxNxGxTxU, None
  return jnp.where(mask_Bx1x1xTxU, s_BxNxGxTxU, NEG), mask_Bx1x1xTxU


def _grouped(x_BxLxHxK, n_kv: int):
  """B x L x H x K -> B x L x N x G x K: query head h uses kv head h // G."""
  B, L, H, K = x_BxLxHxK.shape
  return x_BxLxHxK.reshape(B, L, n_kv, H // n_kv, K)


def _local_attention(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, qpos_BxL, kpos_BxS,
                     causal: bool, qseg_BxL=None, kseg_BxS=None):
  """Ordinary attention with the position (and segment) mask (plain
  autodiff)."""
  B, L, H, K = q_BxLxHxK.shape
  q_BxLxNxGxK = _grouped(q_BxLxHxK, k_BxSxNxK.shape[2])
  s_BxNxGxLxS, _ = _scores(q_BxLxNxGxK, k_BxSxNxK, qpos_BxL, kpos_BxS, causal,
                           qseg_BxL, kseg_BxS)
  p_BxNxGxLxS = jax.nn.softmax(s_BxNxGxLxS, axis=-1)
  out_BxLxNxGxK = jnp.einsum("bngls,bsnk->blngk",
                             p_BxNxGxLxS.astype(v_BxSxNxK.dtype), v_BxSxNxK,
                             preferred_element_type=jnp.float32)
  return out_BxLxNxGxK.reshape(B, L, H, K).astype(q_BxLxHxK.dtype)


def _fwd_block(acc, k_BxUxNxK, v_BxUxNxK, kpos_BxU, kseg_BxU=None, *,
               q_BxTxNxGxK, qpos_BxT, qseg_BxT=None, causal: bool):
  """Folds one K/V tile into the running (max m, denominator l, output o)."""
  m_BxNxGxT, l_BxNxGxT, o_BxNxGxTxK = acc
  s_BxNxGxTxU, mask = _scores(q_BxTxNxGxK, k_BxUxNxK, qpos_BxT, kpos_BxU,
                              causal, qseg_BxT, kseg_BxU)
  m_new = jnp.maximum(m_BxNxGxT, s_BxNxGxTxU.max(axis=-1))
  p_BxNxGxTxU = jnp.exp(s_BxNxGxTxU - m_new[..., None])
  if mask is not None:  # A row with no visible key yet has m_new == NEG.
    p_BxNxGxTxU = jnp.where(mask, p_BxNxGxTxU, 0.0)
  alpha_BxNxGxT = jnp.exp(m_BxNxGxT - m_new)
  pv_BxNxGxTxK = jnp.einsum("bngtu,bunk->bngtk",
                            p_BxNxGxTxU.astype(v_BxUxNxK.dtype), v_BxUxNxK,
                            preferred_element_type=jnp.float32)
  return (m_new, alpha_BxNxGxT * l_BxNxGxT + p_BxNxGxTxU.sum(axis=-1),
          alpha_BxNxGxT[..., None] * o_BxNxGxTxK + pv_BxNxGxTxK), ()


def _bwd_block(dq_BxTxNxGxK, k_BxUxNxK, v_BxUxNxK, kpos_BxU, kseg_BxU,
               dk_BxUxNxK, dv_BxUxNxK, *, q_BxTxNxGxK, qpos_BxT, qseg_BxT,
               do_BxTxNxGxK, lse_BxNxGxT, delta_BxNxGxT, causal: bool):
  """Adds one K/V tile's share of dq, dk, dv, recomputing its probabilities
  from the saved logsumexp instead of keeping them from the forward pass."""
  scale = q_BxTxNxGxK.shape[-1] ** -0.5
  s_BxNxGxTxU, mask = _scores(q_BxTxNxGxK, k_BxUxNxK, qpos_BxT, kpos_BxU,
                              causal, qseg_BxT, kseg_BxU)
  p_BxNxGxTxU = jnp.exp(s_BxNxGxTxU - lse_BxNxGxT[..., None])
  if mask is not None:
    p_BxNxGxTxU = jnp.where(mask, p_BxNxGxTxU, 0.0)
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  dv_BxUxNxK += f32("bngtu,btngk->bunk",
                    p_BxNxGxTxU.astype(do_BxTxNxGxK.dtype), do_BxTxNxGxK)
  dp_BxNxGxTxU = f32("btngk,bunk->bngtu", do_BxTxNxGxK, v_BxUxNxK)
  ds_BxNxGxTxU = (p_BxNxGxTxU * (dp_BxNxGxTxU - delta_BxNxGxT[..., None])
                  * scale).astype(q_BxTxNxGxK.dtype)
  dq_BxTxNxGxK += f32("bngtu,bunk->btngk", ds_BxNxGxTxU, k_BxUxNxK)
  dk_BxUxNxK += f32("bngtu,btngk->bunk", ds_BxNxGxTxU, q_BxTxNxGxK)
  return dq_BxTxNxGxK, (dk_BxUxNxK, dv_BxUxNxK)


def _key_chunks(fn: Callable, carry, *xs_BxU):
  """carry, ys = fn(carry, *xs) over tiles of at most KV_CHUNK keys (a
  `lax.scan`, whose body's buffers are reused); ys re-joined along length.
  An x may be None (no segment ids): it stays None."""
  B, U = xs_BxU[0].shape[:2]
  if U <= KV_CHUNK or U % KV_CHUNK:
    return fn(carry, *xs_BxU)
  c = KV_CHUNK
  tile = lambda x: jnp.moveaxis(x.reshape(B, U // c, c, *x.shape[2:]), 1, 0)
  untile = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, U, *x.shape[3:])
  carry, ys = jax.lax.scan(lambda cr, xs: fn(cr, *xs), carry,
                           [None if x is None else tile(x) for x in xs_BxU])
  return carry, jax.tree.map(untile, ys)


def _split(x) -> list[jax.Array]:
  """The two zig-zag halves of a local shard (length is axis 1); None (no
  segment ids) gives two Nones."""
  if x is None:
    return [None, None]
  return list(jnp.split(x, 2, axis=1))


def _unless_masked(causal: bool, qpos_BxT, kpos_BxU, fn, operand,
                   qseg_BxT=None, kseg_BxU=None):
  """fn(operand), or operand unchanged when no query of the block sees any
  of its keys: `lax.cond` runs only one branch, so a fully masked block costs
  no FLOPs (the causal half of the work). Without segment ids: when every key
  comes after every query in every row. With them, positions restart at each
  document, so that test would rarely hold; the exact one (no visible pair in
  the B x T x U mask, a pass over T x U booleans per H x K of scores work)
  also skips the blocks that share no segment."""
  if qseg_BxT is not None:
    visible = _visible(qpos_BxT, kpos_BxU, causal, qseg_BxT, kseg_BxU)
    return jax.lax.cond(~jnp.any(visible), lambda x: x, fn, operand)
  if not causal:
    return fn(operand)
  masked = jnp.all(kpos_BxU.min(axis=1) > qpos_BxT.max(axis=1))
  return jax.lax.cond(masked, lambda x: x, fn, operand)


def _shift(tree, n: int):
  """Sends every array to the next device along the `sequence` ring."""
  perm = [(i, (i + 1) % n) for i in range(n)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, perm), tree)


def _ring_steps(n: int, travel, state, step: Callable):
  """step(travel, state) -> (travel, state) on the local block, then on the
  n-1 blocks that arrive from the left neighbour. Step 0 is outside the scan
  so that no block is sent that nobody reads."""
  travel, state = step(travel, state)

  def body(carry, _):
    travel, state = carry
    return step(_shift(travel, n), state), None
  (travel, state), _ = jax.lax.scan(body, (travel, state), length=n - 1)
  return travel, state


# seg_BxL: the segment ids, or None; an integer input, so its cotangent (and
# the positions') is None.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ring(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, pos_BxL, seg_BxL, causal: bool,
          n: int):
  return _ring_fwd(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, pos_BxL, seg_BxL, causal,
                   n)[0]


def _ring_fwd(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, pos_BxL, seg_BxL, causal, n):
  B, L, H, K = q_BxLxHxK.shape
  N = k_BxSxNxK.shape[2]
  qs_BxTxNxGxK, qpos_BxT = _split(_grouped(q_BxLxHxK, N)), _split(pos_BxL)
  qseg_BxT = _split(seg_BxL)
  stats_BxNxGxT = (B, N, H // N, L // 2)
  acc = (jnp.full(stats_BxNxGxT, NEG, jnp.float32),
         jnp.zeros(stats_BxNxGxT, jnp.float32),
         jnp.zeros((*stats_BxNxGxT, K), jnp.float32))

  def step(kv, accs):
    accs = list(accs)
    for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]:
      fold = functools.partial(_fwd_block, q_BxTxNxGxK=qs_BxTxNxGxK[i],
                               qpos_BxT=qpos_BxT[i], qseg_BxT=qseg_BxT[i],
                               causal=causal)
      accs[i] = _unless_masked(
          causal, qpos_BxT[i], kv[2][j],
          lambda a: _key_chunks(fold, a, *(x[j] for x in kv))[0], accs[i],
          qseg_BxT[i], kv[3][j])
    return kv, accs

  # K, V, their positions and segment ids (two Nones without) travel.
  kv = (_split(k_BxSxNxK), _split(v_BxSxNxK), qpos_BxT, qseg_BxT)
  _, accs = _ring_steps(n, kv, [acc, acc], step)
  outs_BxTxNxGxK = [jnp.einsum("bngtk->btngk", o / l[..., None])
                    for _, l, o in accs]
  out_BxLxHxK = jnp.concatenate(outs_BxTxNxGxK, axis=1).reshape(
      B, L, H, K).astype(q_BxLxHxK.dtype)
  lses_BxNxGxT = [m + jnp.log(l) for m, l, _ in accs]
  # Saved for the backward ring: O(L/n) per device, never the scores.
  res = (q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, pos_BxL, seg_BxL, out_BxLxHxK,
         lses_BxNxGxT)
  return out_BxLxHxK, res


def _ring_bwd(causal, n, res, do_BxLxHxK):
  (q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, pos_BxL, seg_BxL, out_BxLxHxK,
   lses_BxNxGxT) = res
  B, L, H, K = q_BxLxHxK.shape
  N = k_BxSxNxK.shape[2]
  qs_BxTxNxGxK, qpos_BxT = _split(_grouped(q_BxLxHxK, N)), _split(pos_BxL)
  qseg_BxT = _split(seg_BxL)
  dos_BxTxNxGxK = _split(_grouped(do_BxLxHxK, N))
  # delta = rowsum(dO * O) = rowsum(P * dP), the softmax backward's
  # subtrahend: computed once here rather than from P in every tile.
  deltas_BxNxGxT = [
      jnp.einsum("btngk,btngk->bngt", do.astype(jnp.float32),
                 o.astype(jnp.float32))
      for do, o in zip(dos_BxTxNxGxK, _split(_grouped(out_BxLxHxK, N)))]

  def step(travel, dqs):
    dqs, dks, dvs = list(dqs), list(travel[4]), list(travel[5])
    for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]:
      fold = functools.partial(
          _bwd_block, q_BxTxNxGxK=qs_BxTxNxGxK[i], qpos_BxT=qpos_BxT[i],
          qseg_BxT=qseg_BxT[i], do_BxTxNxGxK=dos_BxTxNxGxK[i],
          lse_BxNxGxT=lses_BxNxGxT[i], delta_BxNxGxT=deltas_BxNxGxT[i],
          causal=causal)
      kv = [x[j] for x in travel[:4]]  # k, v, positions, segment ids.
      dqs[i], (dks[j], dvs[j]) = _unless_masked(
          causal, qpos_BxT[i], kv[2],
          lambda g: _key_chunks(fold, g[0], *kv, *g[1]),
          (dqs[i], (dks[j], dvs[j])), qseg_BxT[i], kv[3])
    return (*travel[:4], dks, dvs), dqs

  # dK and dV accumulate in float32 and travel with their block, so a device
  # holds only its own block's; the n-th hop brings them home.
  zeros = lambda xs: [jnp.zeros(x.shape, jnp.float32) for x in xs]
  ks_BxUxNxK, vs_BxUxNxK = _split(k_BxSxNxK), _split(v_BxSxNxK)
  travel = (ks_BxUxNxK, vs_BxUxNxK, qpos_BxT, qseg_BxT, zeros(ks_BxUxNxK),
            zeros(vs_BxUxNxK))
  travel, dqs = _ring_steps(n, travel, zeros(qs_BxTxNxGxK), step)
  dks, dvs = _shift(travel[4:], n)
  dq_BxLxHxK = jnp.concatenate(dqs, axis=1).reshape(B, L, H, K)
  return (dq_BxLxHxK.astype(q_BxLxHxK.dtype),
          jnp.concatenate(dks, axis=1).astype(k_BxSxNxK.dtype),
          jnp.concatenate(dvs, axis=1).astype(v_BxSxNxK.dtype), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def _gather(x_BxS):
  return jax.lax.all_gather(x_BxS, AXIS, axis=1, tiled=True)


@jax.custom_vjp
def _gather_f32_grad(x_BxS):
  """`_gather` whose transpose (a reduce-scatter) sums in float32: more
  exact for bfloat16 gradients, and XLA:CPU aborts compiling a bfloat16
  reduce-scatter ("Invalid binary instruction opcode copy")."""
  return _gather(x_BxS)


def _gather_bwd(_, g_BxS):
  dx = jax.lax.psum_scatter(g_BxS.astype(jnp.float32), AXIS,
                            scatter_dimension=1, tiled=True)
  return (dx.astype(g_BxS.dtype),)


_gather_f32_grad.defvjp(lambda x: (_gather_f32_grad(x), None), _gather_bwd)


def _all_gather(q_BxLxHxK, k_BxSxNxK, v_BxSxNxK, pos_BxL, seg_BxL=None, *,
                causal: bool):
  return _local_attention(q_BxLxHxK, _gather_f32_grad(k_BxSxNxK),
                          _gather_f32_grad(v_BxSxNxK), pos_BxL,
                          _gather(pos_BxL), causal, seg_BxL,
                          None if seg_BxL is None else _gather(seg_BxL))


def attention(q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array,
              v_BxLxNxK: jax.Array, positions_BxL: jax.Array, *,
              causal: bool, impl: str = "ring",
              segment_ids_BxL: jax.Array | None = None) -> jax.Array:
  """Context-parallel attention over the mesh's `sequence` axis.

  The length axis of q, k, v and positions is sharded over `sequence`; the
  causal mask is computed from the positions (key position <= query
  position), so it is correct for any layout (contiguous or zig-zag). H is a
  multiple of N (grouped-query attention: query head h uses kv head
  h // (H // N)). Softmax scale 1/sqrt(K). Scores, softmax and the online
  accumulation in float32; output in q's dtype. Every query must see at least
  one key (causal self-attention always sees itself). With segment_ids_BxL
  (int32, sharded like the positions) a query sees only its own segment's
  keys; positions must increase with the index within a segment.

  Only `sequence` is manual inside: batch and heads keep whatever sharding
  (data, fsdp, tensor) XLA propagates to them. Without a mesh, or with
  sequence=1, this is ordinary attention with the position mask.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}; expected one of {IMPLS}.")
  n = mesh_lib.axis_size(AXIS)
  seg_BxL = segment_ids_BxL
  if n == 1:
    return _local_attention(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, positions_BxL,
                            positions_BxL, causal, seg_BxL, seg_BxL)
  # The ring cuts every local shard into its two zig-zag halves.
  multiple = 2 * n if impl == "ring" else n
  if q_BxLxHxK.shape[1] % multiple:
    raise ValueError(f"length {q_BxLxHxK.shape[1]} must be a multiple of "
                     f"{multiple} for impl={impl!r} over sequence={n}.")
  if impl == "ring":
    local = lambda q, k, v, pos, seg=None: _ring(q, k, v, pos, seg, causal, n)
  else:
    local = functools.partial(_all_gather, causal=causal)
  args = (q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, positions_BxL)
  if seg_BxL is not None:
    args += (seg_BxL,)
  seq = P(None, AXIS)
  return jax.shard_map(local, in_specs=(seq,) * len(args), out_specs=seq,
                       axis_names={AXIS}, check_vma=False)(*args)
