"""Decoder-only Transformer LM: RoPE, RMSNorm (pre-norm), grouped-query
attention, SwiGLU (or GELU) MLP or a mixture of experts, optional tied
embeddings, optional scan over layers with a configurable remat policy.

The same blocks serve a bidirectional encoder (`causal=False`).

Parallelism follows the mesh, not flags (lm/parallel): with a `sequence`
axis > 1 attention is ring (or all-gather) attention over it; with a `stage`
axis > 1 the stacked layers run as a GPipe pipeline; with MoE layers, experts
are split over the `expert` axis. Data, FSDP and tensor parallelism come
from the rules table alone.

Shapes: B batch, L query length, S key/cache length, D d_model, F d_ff,
H query heads, N kv heads, K head dim, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lm import backend as backend_lib, checks
from lm.models import attention, layers, moe as moe_lib, tuning
from lm.parallel import axis_size, constrain, context, pipeline

# One layer's KV cache: {"k": B x S x N x K, "v": same}, and for packed
# decoding the keys' "segment_ids": B x S int32 (init_cache(segments=True)).
LayerCache = dict[str, jax.Array]
# The model's (Model.init_cache), by cfg.scan_layers:
#   False: a tuple of n_layers LayerCaches. A decode step writes each array
#          in place (dynamic_update_slice into a donated buffer); one stacked
#          array would be sliced per layer and re-stacked, i.e. copied whole,
#          at every step (docs/performance.md, log entry 11).
#   True:  one LayerCache of [layers]-stacked arrays, as nnx.scan slices and
#          stacks the layers (so a scanned decode step still copies it).
Cache = tuple[LayerCache, ...] | LayerCache

OPTIMIZER_GROUPS = ()  # One optimizer state for all parameters.


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 256
  max_len: int = 256  # Positional limit: longest sequence (or KV cache).
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  d_ff: int = 512
  head_dim: int = 0  # 0: d_model // n_heads.
  mlp: str = "swiglu"  # "swiglu" | "gelu".
  rope_base: float = 10_000.0
  rope_scaling: layers.RopeScaling = layers.RopeScaling()  # kind "llama3".
  # Biases on the q, k, v projections (Qwen2) and on the output projection
  # (with qkv_bias: Llama's attention_bias); zero at init.
  qkv_bias: bool = False
  out_bias: bool = False
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  causal: bool = True
  scan_layers: bool = False  # nnx.scan over stacked layers: O(1) compile.
  remat: str = "none"  # A key of tuning.REMAT_POLICIES.
  # A key of attention.BACKENDS: "auto" (cudnn where it runs, else
  # chunked) | "chunked" (ours) | "xla" | "cudnn".
  attention_impl: str = "auto"
  attention_chunks: int = 2  # Query chunks of the "chunked" causal attention.
  # Projection gradients: "small_left" (tuning.weight_einsum) | "autodiff".
  einsum_grad: str = "small_left"
  # One D x N x (G+2) x K projection for q, k and v (G = H/N query heads per
  # kv head) instead of three: one GEMM with 3x the columns. Another
  # parameter tree: checkpoints do not carry over between the two.
  fused_qkv: bool = False
  # Attention when the mesh's `sequence` axis > 1: "ring" | "all_gather".
  context_parallel: str = "ring"
  moe: moe_lib.Config = moe_lib.Config()  # experts > 0: MoE MLPs.
  # GPipe microbatches when the mesh's `stage` axis > 1
  # (config.train.microbatches).
  pipeline_microbatches: int = 1
  dtype: str = "float32"  # Compute dtype.
  # The dtype every matmul's operands are widened to ("" = the compute
  # dtype): "float32" runs bfloat16 models' GEMMs in float32 on CPUs without
  # BF16 GEMM instructions (config.precision.cpu_bf16_dots; the results are
  # still rounded to the compute dtype where the plain path rounds them).
  dot_dtype: str = ""
  param_dtype: str = "float32"

  @property
  def k(self) -> int:
    return self.head_dim or self.d_model // self.n_heads


MLPS = ("swiglu", "gelu")


def check(cfg: Config, mesh: dict[str, int]) -> None:
  """Options, shapes and shapes against the mesh's axis sizes."""
  require, one_of = checks.require, checks.one_of
  one_of(cfg.remat, tuning.REMAT_POLICIES, "config.model.remat")
  one_of(cfg.mlp, MLPS, "config.model.mlp")
  one_of(cfg.attention_impl, attention.BACKENDS,
         "config.model.attention_impl")
  # Known choices this backend cannot run: an error, never a silent fallback.
  backend = backend_lib.name()  # The AOT target's, when compiling for one.
  for key, value, choices, needs in (
      ("remat", cfg.remat, tuning.REMAT_POLICIES, tuning.REMAT_BACKENDS),
      ("attention_impl", cfg.attention_impl, attention.BACKENDS,
       attention.BACKENDS)):
    here = [c for c in choices if backend in needs.get(c, (backend,))]
    require(value in here,
            f"config.model.{key}={value!r} needs a "
            f"{' or '.join(needs.get(value, ()))} backend; this one is "
            f"{backend}. Use one of {here}.")
  one_of(cfg.einsum_grad, layers.EINSUM_GRADS, "config.model.einsum_grad")
  for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
              "vocab_size", "max_len", "attention_chunks"):
    require(getattr(cfg, key) > 0, f"config.model.{key}={getattr(cfg, key)} "
            "must be positive.")
  require(cfg.n_heads % cfg.n_kv_heads == 0,
          f"config.model.n_heads={cfg.n_heads} is not a multiple of "
          f"config.model.n_kv_heads={cfg.n_kv_heads}: grouped-query attention"
          " shares each kv head among n_heads/n_kv_heads query heads.")
  require(cfg.head_dim or cfg.d_model % cfg.n_heads == 0,
          f"config.model.d_model={cfg.d_model} is not divisible by "
          f"config.model.n_heads={cfg.n_heads}; change one, or set "
          "config.model.head_dim.")
  layers.check_rope_scaling(cfg.rope_scaling, "config.model.rope_scaling")
  require(cfg.k % 2 == 0, f"head dim {cfg.k} must be even for RoPE; set "
          "config.model.head_dim or change d_model/n_heads.")

  t, f = mesh["tensor"], mesh["fsdp"]
  for key in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
    value = getattr(cfg, key)
    require(value % t == 0,
            f"config.model.{key}={value} is not divisible by "
            f"config.mesh.tensor={t}: tensor parallelism splits it evenly. "
            f"Pick a tensor size that divides it, or change {key}.")
  require(cfg.d_model % f == 0,
          f"config.model.d_model={cfg.d_model} is not divisible by "
          f"config.mesh.fsdp={f}: FSDP splits every weight's d_model axis.")
  if mesh["sequence"] > 1:
    one_of(cfg.context_parallel, context.IMPLS,
           "config.model.context_parallel")
  stage = mesh["stage"]
  if stage > 1:
    require(cfg.scan_layers,
            f"config.mesh.stage={stage} needs config.model.scan_layers=True:"
            " the pipeline splits the stacked layer axis over stages.")
    require(cfg.n_layers % stage == 0,
            f"config.model.n_layers={cfg.n_layers} is not divisible by "
            f"config.mesh.stage={stage}: each stage holds the same number "
            "of layers. Change n_layers or the number of stages.")
  moe_lib.check(cfg.moe, mesh)


class Attention(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    D, H, N, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.k
    dense = functools.partial(layers.Einsum, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs,
                              grad=cfg.einsum_grad, dot_dtype=cfg.dot_dtype)
    if cfg.fused_qkv:
      # Per kv head n: its G query heads, then k, then v. Query head n*G + g
      # is the one jax.nn.dot_product_attention groups with kv head n.
      self.qkv = dense("bld,dngk->blngk", (D, N, H // N + 2, K),
                       ("embed", "kv_heads", None, "head_dim"), fan_in=D,
                       bias=3 * cfg.qkv_bias)
    else:
      self.q = dense("bld,dhk->blhk", (D, H, K),
                     ("embed", "heads", "head_dim"), fan_in=D,
                     bias=2 * cfg.qkv_bias)
      self.k = dense("bld,dnk->blnk", (D, N, K),
                     ("embed", "kv_heads", "head_dim"), fan_in=D,
                     bias=2 * cfg.qkv_bias)
      self.v = dense("bld,dnk->blnk", (D, N, K),
                     ("embed", "kv_heads", "head_dim"), fan_in=D,
                     bias=2 * cfg.qkv_bias)
    self.o = dense("blhk,hkd->bld", (H, K, D), ("heads", "head_dim", "embed"),
                   fan_in=H * K, bias=1 * cfg.out_bias)
    self.cfg = cfg

  def project(self, x_BxLxD, positions_BxL):
    """(q B x L x H x K, k and v B x L x N x K) as attention reads them:
    after RoPE, in the compute (or dot) dtype. Also what lm/explain reads
    to recompute a layer's attention probabilities."""
    cfg = self.cfg
    if cfg.fused_qkv:
      # S = G + 2 slots per kv head; float32 for RoPE, as below.
      qkv_BxLxNxSxK = self.qkv(x_BxLxD, out_dtype=jnp.float32)
      B, L, N, S, K = qkv_BxLxNxSxK.shape
      q_BxLxHxK = qkv_BxLxNxSxK[:, :, :, :S - 2].reshape(B, L, N * (S - 2), K)
      k_BxLxNxK = qkv_BxLxNxSxK[:, :, :, S - 2]
      v_BxLxNxK = qkv_BxLxNxSxK[:, :, :, S - 1].astype(cfg.dtype)
    else:
      # q and k stay in the float32 accumulator for RoPE (computed in
      # float32) and are rounded to the compute dtype once, after it.
      q_BxLxHxK = self.q(x_BxLxD, out_dtype=jnp.float32)
      k_BxLxNxK = self.k(x_BxLxD, out_dtype=jnp.float32)
      v_BxLxNxK = self.v(x_BxLxD)
    q_BxLxHxK = layers.rope(q_BxLxHxK, positions_BxL, cfg.rope_base,
                            cfg.max_len, cfg.rope_scaling).astype(cfg.dtype)
    k_BxLxNxK = layers.rope(k_BxLxNxK, positions_BxL, cfg.rope_base,
                            cfg.max_len, cfg.rope_scaling).astype(cfg.dtype)
    q_BxLxHxK = constrain(q_BxLxHxK, "batch", "length", "act_heads", None)
    k_BxLxNxK = constrain(k_BxLxNxK, "batch", "length", "act_kv_heads", None)
    v_BxLxNxK = constrain(v_BxLxNxK, "batch", "length", "act_kv_heads", None)
    if cfg.dot_dtype:
      # Attention's matmuls in the dot dtype too; its output feeds `o`,
      # which would widen it anyway.
      q_BxLxHxK, k_BxLxNxK, v_BxLxNxK = (
          t.astype(cfg.dot_dtype) for t in (q_BxLxHxK, k_BxLxNxK, v_BxLxNxK))
    return q_BxLxHxK, k_BxLxNxK, v_BxLxNxK

  def __call__(self, x_BxLxD, positions_BxL, cache: LayerCache | None,
               cache_index, segment_ids_BxL=None):
    cfg = self.cfg
    q_BxLxHxK, k_BxLxNxK, v_BxLxNxK = self.project(x_BxLxD, positions_BxL)
    if cache is None and axis_size("sequence") > 1:
      # Context parallelism: the mask comes from the positions, since the
      # LM feeds the sequence in the zig-zag layout (lm/tasks/language.py).
      out_BxLxHxK = context.attention(
          q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, positions_BxL, causal=cfg.causal,
          impl=cfg.context_parallel, segment_ids_BxL=segment_ids_BxL)
      new_cache = None
    elif cache is None:
      out_BxLxHxK = attention.attend(
          q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, causal=cfg.causal,
          impl=cfg.attention_impl, chunks=cfg.attention_chunks,
          segment_ids_BxL=segment_ids_BxL)
      new_cache = None
    else:
      # Decoding: write this chunk's keys/values at cache_index, then attend
      # to every filled cache slot at or before each query's position.
      # cache_index is a scalar (every row at the same position), or one
      # index per row (a server's slots, each request at its own position).
      write = _cache_writer(jnp.ndim(cache_index))
      k_BxSxNxK = write(cache["k"], k_BxLxNxK.astype(cache["k"].dtype),
                        cache_index)
      v_BxSxNxK = write(cache["v"], v_BxLxNxK.astype(cache["v"].dtype),
                        cache_index)
      L, S = q_BxLxHxK.shape[1], k_BxSxNxK.shape[1]
      q_pos_BxL = jnp.reshape(cache_index, (-1, 1)) + jnp.arange(L)
      # [1 or B, 1, L, S]: broadcast over the heads (and a scalar's batch).
      mask_Bx1xLxS = (jnp.arange(S)[None, None, None, :]
                      <= q_pos_BxL[:, None, :, None])
      new_cache = {"k": k_BxSxNxK, "v": v_BxSxNxK}
      if (segment_ids_BxL is None) != ("segment_ids" not in cache):
        raise ValueError(
            "Decoding with segment ids needs a cache made with "
            "init_cache(..., segments=True), and such a cache needs them.")
      if segment_ids_BxL is not None:
        # Several requests packed in one row: the cache keeps each slot's
        # segment, and a query sees only its own segment's slots.
        attention.check_segments(cfg.attention_impl)
        if jnp.ndim(cache_index):
          raise ValueError("Segment ids need a scalar cache_index.")
        seg_BxS = jax.lax.dynamic_update_slice(
            cache["segment_ids"], segment_ids_BxL.astype(jnp.int32),
            (0, cache_index))
        mask_Bx1xLxS = mask_Bx1xLxS & attention.segment_mask(
            segment_ids_BxL, seg_BxS)
        new_cache["segment_ids"] = seg_BxS
      out_BxLxHxK = attention.attend(
          q_BxLxHxK, k_BxSxNxK.astype(q_BxLxHxK.dtype),
          v_BxSxNxK.astype(q_BxLxHxK.dtype), causal=False,
          mask=mask_Bx1xLxS, impl=cfg.attention_impl)
    return self.o(out_BxLxHxK), new_cache


def _cache_writer(index_ndim: int):
  """f(cache_BxSxNxK, new_BxLxNxK, index) writing `new` at position `index`
  of every row (index a scalar) or at index[b] of row b (index of shape B:
  vmapped, a scatter)."""
  def write(cache_SxNxK, new_LxNxK, index):
    return jax.lax.dynamic_update_slice(cache_SxNxK, new_LxNxK, (index, 0, 0))
  if index_ndim:
    return jax.vmap(write)
  return lambda cache, new, index: jax.lax.dynamic_update_slice(
      cache, new, (0, index, 0, 0))


class Mlp(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    D, F = cfg.d_model, cfg.d_ff
    dense = functools.partial(layers.Einsum, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs,
                              grad=cfg.einsum_grad, dot_dtype=cfg.dot_dtype)
    if cfg.mlp == "swiglu":
      self.gate = dense("bld,df->blf", (D, F), ("embed", "mlp"), fan_in=D)
    self.up = dense("bld,df->blf", (D, F), ("embed", "mlp"), fan_in=D)
    self.down = dense("blf,fd->bld", (F, D), ("mlp", "embed"), fan_in=F)
    self.kind = cfg.mlp
    self.dtype = cfg.dtype

  def __call__(self, x_BxLxD):
    # The activation reads the float32 accumulator (every matmul accumulates
    # in float32, tuning.accumulate_einsum) and is rounded to the compute
    # dtype once, for the down projection: one rounding instead of two.
    up_BxLxF = self.up(x_BxLxD, out_dtype=jnp.float32)
    if self.kind == "swiglu":
      gate_BxLxF = self.gate(x_BxLxD, out_dtype=jnp.float32)
      h_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
    else:
      h_BxLxF = jax.nn.gelu(up_BxLxF)
    h_BxLxF = constrain(h_BxLxF.astype(self.dtype), "batch", "length",
                        "act_mlp")
    return self.down(h_BxLxF)


class Block(nnx.Module):
  """Pre-norm residual block. Under tensor parallelism the attention and MLP
  outputs are each reduced once over `tensor` (row-parallel o / down).
  Returns (x, cache, aux): aux holds an MoE layer's auxiliary losses and
  statistics (empty for a dense MLP)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    norm = functools.partial(layers.RMSNorm, cfg.d_model, eps=cfg.norm_eps,
                             dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             rngs=rngs)
    self.attn_norm = norm()
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = norm()
    if cfg.moe.experts:
      self.mlp = moe_lib.MoeMlp(cfg.moe, cfg.d_model, cfg.d_ff,
                                dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                rngs=rngs)
    else:
      self.mlp = Mlp(cfg, rngs)

  def __call__(self, x_BxLxD, positions_BxL, cache=None, cache_index=None,
               segment_ids_BxL=None):
    h_BxLxD, cache = self.attn(self.attn_norm(x_BxLxD), positions_BxL, cache,
                               cache_index, segment_ids_BxL)
    x_BxLxD = x_BxLxD + h_BxLxD
    h_BxLxD = self.mlp(self.mlp_norm(x_BxLxD))
    aux = {}
    if isinstance(h_BxLxD, tuple):  # A mixture of experts.
      h_BxLxD, aux = h_BxLxD
    x_BxLxD = x_BxLxD + h_BxLxD
    return constrain(x_BxLxD, "batch", "length", "act_embed"), cache, aux


class Transformer(nnx.Module):
  """Token ids -> hidden states; `Model` adds the LM head."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    embed_init = layers.param_init(
        nnx.initializers.normal(stddev=cfg.d_model ** -0.5), "vocab", "embed")
    self.embedding = nnx.Param(embed_init(
        rngs.params(), (cfg.vocab_size, cfg.d_model), cfg.param_dtype))
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0,
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(rngs):
        return Block(cfg, rngs)
      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps,
                                     dtype=cfg.dtype,
                                     param_dtype=cfg.param_dtype, rngs=rngs)

  def embed(self, tokens_BxL: jax.Array) -> jax.Array:
    # Gather the (FSDP/tensor-sharded) table whole before the lookup, as FSDP
    # does for every weight; a lookup into the sharded table makes XLA pick a
    # layout it can only undo by full rematerialization.
    table_VxD = constrain(self.embedding[...], None, None)
    x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0)
    return constrain(x_BxLxD.astype(self.cfg.dtype), "batch", "length",
                     "act_embed")

  def __call__(self, tokens_BxL, positions_BxL=None, cache=None,
               cache_index=None, segment_ids_BxL=None):
    """segment_ids_BxL (int32, optional): packed documents; a token attends
    only to tokens of its own segment (attention.py). The caller gives
    positions that restart at each document."""
    cfg = self.cfg
    if positions_BxL is None:
      # A scalar start, or one per row (a per-row cache_index).
      start = 0 if cache_index is None else jnp.reshape(cache_index, (-1, 1))
      positions_BxL = start + jnp.broadcast_to(
          jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    x_BxLxD = self.embed(tokens_BxL)
    if cache is not None:
      _check_layout(cfg, cache)

    # The per-token inputs travel as one argument (tuning.remat's and
    # gpipe's): the positions, or with segment ids the pair.
    tokens_in = (positions_BxL if segment_ids_BxL is None
                 else (positions_BxL, segment_ids_BxL))

    def run_block(block, x_BxLxD, layer_cache, tokens_in):
      positions_BxL, segment_ids_BxL = (
          tokens_in if isinstance(tokens_in, tuple) else (tokens_in, None))
      return block(x_BxLxD, positions_BxL, layer_cache, cache_index,
                   segment_ids_BxL)

    if cfg.remat != "none":
      run_block = tuning.remat(run_block, cfg.remat)

    aux = {}
    if cfg.scan_layers and cache is None and axis_size("stage") > 1:
      # GPipe over the `stage` axis; the layer axis is split over stages.
      graphdef, stacked = nnx.split(self.blocks)
      # gpipe microbatches one per-token array: with segment ids, the
      # positions and ids stacked on a last axis of 2.
      extra_BxLx = (positions_BxL if segment_ids_BxL is None else jnp.stack(
          [positions_BxL, segment_ids_BxL], axis=-1).astype(jnp.int32))

      def layer_fn(layer_params, x_BxLxD, extra_bxLx):
        block = nnx.merge(graphdef, layer_params)
        tokens_in = (extra_bxLx if segment_ids_BxL is None
                     else (extra_bxLx[..., 0], extra_bxLx[..., 1]))
        return run_block(block, x_BxLxD, None, tokens_in)[0]

      # Blocks already rematerialized by cfg.remat need no second, per-stage
      # remat: it would run every block's forward a third time.
      x_BxLxD = pipeline.gpipe(layer_fn, stacked, x_BxLxD, extra_BxLx,
                               microbatches=cfg.pipeline_microbatches,
                               remat=cfg.remat == "none")
      new_cache = None
    elif cfg.scan_layers:
      @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def scan_blocks(block, x_BxLxD, layer_cache):
        return run_block(block, x_BxLxD, layer_cache, tokens_in)
      x_BxLxD, new_cache, aux_layers = scan_blocks(self.blocks, x_BxLxD,
                                                   cache)
      aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), aux_layers)
    else:
      layer_caches = (None,) * cfg.n_layers if cache is None else cache
      new_layers, aux_layers = [], []
      for block, layer_cache in zip(self.blocks, layer_caches):
        x_BxLxD, c, a = run_block(block, x_BxLxD, layer_cache, tokens_in)
        new_layers.append(c)
        aux_layers.append(a)
      new_cache = None if cache is None else tuple(new_layers)
      aux = jax.tree.map(lambda *a: sum(a) / len(a), *aux_layers)
    if aux and cache is None:
      # The layers' mean MoE losses and statistics, for the task's loss
      # (read with nnx.capture in lm/tasks/language.py) without changing
      # what __call__ returns. Decoding (a cache) has no loss, and a sow
      # there would mutate the module inside a decode loop's trace
      # (sample.generate's lax.scan), which nnx refuses.
      self.sow(nnx.Intermediate, "moe_aux", aux)
    return self.final_norm(x_BxLxD), new_cache


class Model(nnx.Module):
  """Decoder-only LM: tokens -> float32 logits (and an updated KV cache)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    self.transformer = Transformer(cfg, rngs)
    if not cfg.tie_embeddings:
      self.head = layers.Einsum(
          "bld,dv->blv", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
          fan_in=cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
          rngs=rngs, grad=cfg.einsum_grad, dot_dtype=cfg.dot_dtype)

  def __call__(self, tokens_BxL, positions_BxL=None, cache: Cache | None = None,
               cache_index=None, segment_ids_BxL=None
               ) -> tuple[jax.Array, Cache | None]:
    x_BxLxD, cache = self.transformer(tokens_BxL, positions_BxL, cache,
                                      cache_index, segment_ids_BxL)
    return self.logits(x_BxLxD), cache

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """Final hidden states -> float32 logits B x L x V (the LM head)."""
    if self.cfg.tie_embeddings:
      logits_BxLxV = layers.einsum_for(self.cfg.einsum_grad)(
          "bld,vd->blv", x_BxLxD.astype(self.cfg.dot_dtype or x_BxLxD.dtype),
          self.transformer.embedding[...], jnp.float32)
    else:
      logits_BxLxV = self.head(x_BxLxD, out_dtype=jnp.float32)
    logits_BxLxV = constrain(logits_BxLxV, "batch", "length", "act_vocab")
    # The loss and sampling read float32 logits whatever the compute dtype.
    return logits_BxLxV.astype(jnp.float32)

  def init_cache(self, batch: int, length: int, dtype=None,
                 segments: bool = False) -> Cache:
    """An empty KV cache in this model's layout (`Cache`); `segments`: also
    the keys' segment ids, for decoding with segment_ids_BxL (several
    requests packed in one row)."""
    cfg = self.cfg
    dtype = dtype or cfg.dtype

    def layer(*layers_):  # layers_: () or (n_layers,), the stacked axis.
      shape = (*layers_, batch, length, cfg.n_kv_heads, cfg.k)
      out = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
      if segments:
        out["segment_ids"] = jnp.zeros(shape[:-2], jnp.int32)
      return out
    if cfg.scan_layers:
      return layer(cfg.n_layers)
    return tuple(layer() for _ in range(cfg.n_layers))


def _check_layout(cfg: Config, cache: Cache) -> None:
  """The other layout would fail several calls deeper with a confusing
  shape error, or worse scan the batch axis as layers."""
  stacked = isinstance(cache, dict)
  if cfg.scan_layers and not stacked:
    raise ValueError("A model with scan_layers=True takes one dict of "
                     "[layers]-stacked caches (Model.init_cache), not "
                     f"a {type(cache).__name__}.")
  if not cfg.scan_layers and (stacked or len(cache) != cfg.n_layers):
    raise ValueError(
        f"A model with scan_layers=False takes a tuple of {cfg.n_layers} "
        "per-layer caches (Model.init_cache), not "
        f"{'one stacked dict' if stacked else len(cache)}.")


def cache_batch_axis(cache: Cache) -> int:
  """The batch axis of every array in `cache` (behind the stacked layers'
  axis in a scanned model's)."""
  return 1 if isinstance(cache, dict) else 0


def stack_cache(cache: Cache) -> LayerCache:
  """`cache` as [layers]-stacked arrays whatever its layout (a per-layer
  cache is copied): an interface that must not depend on scan_layers
  (lm/interop/export.py)."""
  if isinstance(cache, dict):
    return cache
  return jax.tree.map(lambda *c: jnp.stack(c), *cache)


def unstack_cache(cfg: Config, stacked: LayerCache) -> Cache:
  """stack_cache's inverse: [layers]-stacked arrays in `cfg`'s layout."""
  if cfg.scan_layers:
    return stacked
  return tuple({name: a[i] for name, a in stacked.items()}
               for i in range(cfg.n_layers))


def flops_per_token(cfg: Config, seq_len: int) -> float:
  """Analytic training FLOPs per token (forward + backward = 3x forward).

  Counts matmuls only: projections, MLP, LM head, and the two attention
  matmuls over the full L x L score matrix (PaLM's convention; what
  jax.nn's XLA attention computes, although half of it is masked for causal
  attention). Model FLOPs, not hardware FLOPs: the "chunked" attention
  computes less (3/4 of the score matrix with 2 chunks) for the same count,
  so MFU compares implementations at equal work.
  """
  D, F, H, N, K, V = (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads,
                      cfg.k, cfg.vocab_size)
  mlp_mats = 3 if cfg.mlp == "swiglu" else 2
  per_layer = 2 * (D * H * K * 2 + D * N * K * 2 + mlp_mats * D * F)
  per_layer += 2 * 2 * seq_len * H * K  # q.k^T and p.v
  forward = cfg.n_layers * per_layer + 2 * D * V
  return 3.0 * forward


def make(cfg: Config, rngs: nnx.Rngs) -> Model:
  return Model(cfg, rngs)


def example_input(cfg: Config) -> jax.Array:
  """A batch `__call__` accepts (tools that trace the model, e.g. lm/quant)."""
  return jnp.zeros((1, min(8, cfg.max_len)), jnp.int32)
