"""GPipe pipeline parallelism over the mesh's `stage` axis, with `jax.shard_map`.

Stage s holds the contiguous layers [s*n/S, (s+1)*n/S) of a stacked (scanned)
layer pytree. The batch is cut into M microbatches; at tick t stage s runs
microbatch t - s and hands its output to stage s + 1 with a `ppermute`, so the
forward pass takes M + S - 1 ticks, of which S - 1 are each stage's bubble.
The backward pass is autodiff of this schedule: the transpose of the forward
`ppermute` is the reverse `ppermute`, which is exactly GPipe's backward.

The `shard_map` is manual over `stage` only: data, fsdp, tensor (...) stay
automatic, so the layers' own sharding constraints still apply inside a stage.

Shapes: B batch, M microbatches, b = B / M rows per microbatch, T = M + S - 1
ticks, L length, D model width.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.parallel import mesh as mesh_lib

STAGE = "stage"

# layer_fn(one layer's params, x_bxLxD, extra_bxL) -> x_bxLxD.
LayerFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def bubble_fraction(stages: int, microbatches: int) -> float:
  """The share of its M + S - 1 ticks that each stage idles."""
  return (stages - 1) / (microbatches + stages - 1)


def _split(a_Bx: jax.Array, m: int) -> jax.Array:
  """B x ... -> M x b x ...: microbatch i is rows i, i + M, i + 2M, ...

  Strided rather than contiguous because the batch is sharded contiguously
  over the data axes: row r lives on data shard r // (B / data), so a strided
  microbatch keeps b / data rows on every data shard (the reshape splits B
  into b x M with b still sharded, no communication), whereas contiguous rows
  i*b .. (i+1)*b would sit on one or a few data shards and leave the others
  idle or force a reshard. (Checked in the compiled HLO, data=4 x stage=2,
  B=8, M=2: strided adds no collective; contiguous adds an all-to-all, two
  all-gathers and four collective-permutes.) Keep b a multiple of the batch's
  shard count (data x fsdp x expert), else XLA regathers the microbatches.
  """
  return jnp.swapaxes(a_Bx.reshape(a_Bx.shape[0] // m, m, *a_Bx.shape[1:]),
                      0, 1)


def _unsplit(a_Mxbx: jax.Array) -> jax.Array:
  """The inverse of `_split`."""
  return jnp.swapaxes(a_Mxbx, 0, 1).reshape(-1, *a_Mxbx.shape[2:])


def _scan_layers(layer_fn: LayerFn, params, x_bxLxD, extra_bxL):
  def body(x_bxLxD, layer_params):
    return layer_fn(layer_params, x_bxLxD, extra_bxL), None
  return jax.lax.scan(body, x_bxLxD, params)[0]


def _schedule(layer_fn: LayerFn, stages: int, microbatches: int, remat: bool,
              params, x_MxbxLxD, extra_Mxbx):
  """One stage's view (inside the shard_map): `params` holds its n/S layers."""
  S, M = stages, microbatches
  s = jax.lax.axis_index(STAGE)
  run_stage = functools.partial(_scan_layers, layer_fn)
  if remat:
    run_stage = jax.checkpoint(run_stage)
  # Stage 0 reads microbatch t at tick t; the S - 1 drain ticks read padding.
  x_TxbxLxD = jnp.pad(x_MxbxLxD, [(0, S - 1)] + [(0, 0)] * (x_MxbxLxD.ndim - 1))
  to_next = [(i, i + 1) for i in range(S - 1)]

  def tick(received_bxLxD, inputs):
    t, fresh_bxLxD = inputs
    m = t - s  # This stage's microbatch at this tick, if 0 <= m < M.
    x_bxLxD = jnp.where(s == 0, fresh_bxLxD, received_bxLxD)
    extra_bxL = extra_Mxbx[jnp.clip(m, 0, M - 1)]
    # A real branch, not a mask: an idle (bubble) tick skips its layers, and
    # the backward of cond is a cond, so it skips them there too. Every
    # device of one stage takes the same branch, so collectives over the
    # automatic axes inside the layers stay matched.
    y_bxLxD = jax.lax.cond(
        (m >= 0) & (m < M),
        lambda x: run_stage(params, x, extra_bxL),
        lambda x: x, x_bxLxD)
    # The last stage sends nothing; stage 0 receives zeros and ignores them.
    # (The last tick's transfer is wasted: one microbatch's activations.)
    return jax.lax.ppermute(y_bxLxD, STAGE, to_next), y_bxLxD

  _, ys_TxbxLxD = jax.lax.scan(
      tick, jnp.zeros_like(x_MxbxLxD[0]), (jnp.arange(M + S - 1), x_TxbxLxD))
  # On the last stage, tick S - 1 + i finished microbatch i.
  y_MxbxLxD = ys_TxbxLxD[S - 1:]
  # Replicate the last stage's outputs over `stage` with a masked psum: one
  # all-reduce forward, one backward (with check_vma=False the cotangent's
  # psum). The alternative, out_specs over `stage` and taking the last slice
  # outside, compiles (XLA:CPU, S=4) to a collective-permute plus an
  # all-reduce forward and another collective-permute backward, and keeps S
  # output copies alive, so the psum is the cheaper of the two.
  return jax.lax.psum(jnp.where(s == S - 1, y_MxbxLxD, 0), STAGE)


def gpipe(layer_fn: LayerFn, stacked_params, x_BxLxD: jax.Array,
          extra_BxL: jax.Array, *, microbatches: int,
          remat: bool = True) -> jax.Array:
  """Applies n_layers layers in order, pipelined over the `stage` mesh axis.

  Computes x = layer_fn(params_i, x, extra) for i in range(n_layers), where
  every leaf of `stacked_params` has a leading n_layers axis (stage s holds
  layers [s*n/S, (s+1)*n/S)). The batch is cut into `microbatches` strided
  microbatches (see `_split`) and run with the GPipe schedule over M + S - 1
  ticks; `extra_BxL` (e.g. token positions) is microbatched the same way and
  reaches every stage. Returns y_BxLxD, replicated over `stage`.

  `remat` (GPipe's re-materialization): keep only each stage's input per
  microbatch and recompute the stage's forward in the backward pass. Besides
  the memory, it is faster on XLA:CPU: without it every tick, idle ones too,
  carries all its layers' activations out of the `cond` and through the tick
  scan (measured: an idle tick cost 40% of a busy one's forward + backward;
  with remat about 4%, for one extra forward).

  Without a mesh, or with `stage` of size 1, the layers are simply scanned
  over the whole batch (microbatching would not change the result).
  """
  n_layers = jax.tree.leaves(stacked_params)[0].shape[0]
  B, M = x_BxLxD.shape[0], microbatches
  if M < 1 or B % M:
    raise ValueError(f"gpipe: microbatches={M} must divide the batch {B}.")
  S = mesh_lib.axis_size(STAGE)
  if S == 1:
    return _scan_layers(layer_fn, stacked_params, x_BxLxD, extra_BxL)
  if n_layers % S:
    raise ValueError(f"gpipe: n_layers={n_layers} is not divisible by the "
                     f"{S} pipeline stages (mesh axis `stage`).")
  run = jax.shard_map(
      functools.partial(_schedule, layer_fn, S, M, remat),
      in_specs=(jax.tree.map(lambda _: P(STAGE), stacked_params), P(), P()),
      out_specs=P(), axis_names={STAGE}, check_vma=False)
  return _unsplit(run(stacked_params, _split(x_BxLxD, M),
                      _split(extra_BxL, M)))
