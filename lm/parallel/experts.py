"""Expert parallelism: dispatch tokens to their experts' slots, combine back.

Tokens are routed in groups, and a group gives every expert C slots. On a
mesh, a group is the tokens one device holds (GShard): a `jax.shard_map`
manual over the axes that split tokens (the rules' batch axes, which include
`expert`, and its length axes) runs the routing locally. With G > 1 devices
on `expert`, it scatters the group into an E x C x D buffer, one `all_to_all`
gives every shard the slots of its own M = E / G experts from all G shards,
the experts run, a second `all_to_all` brings the results home, and a gather
weighted by the gates combines them. Without a mesh all tokens are one group.

Why manual over the token axes and not over `expert` alone: measured on
jax 0.10 / XLA:CPU, an `all_to_all` (and `lax.top_k`) whose operand is
still sharded over an automatic axis (data, fsdp) is preceded by an
all-gather over that axis, so every data replica would run all the experts'
work. Parameters stay automatic over fsdp and tensor: the shard_map boundary
gathers an fsdp-split weight, as FSDP does before any use.

Letters: B batch, L length, D model, T tokens in a group, R routing choices
per token (top_k), E experts, C slots per expert, G expert shards, M experts
per shard (E / G), N devices that split tokens.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.parallel import rules as rules_lib

AXIS = "expert"  # The mesh axis the all_to_alls run over.


class Routing(NamedTuple):
  slot_TxR: jax.Array  # expert * C + position; E * C for a dropped choice.
  gate_TxR: jax.Array  # Combine weight of each choice.
  stats: dict[str, jax.Array]  # Means over the group's tokens.


RouteFn = Callable[[jax.Array, jax.Array, int], Routing]  # (x_TxD, router, C)
ExpertFn = Callable[..., jax.Array]  # (x_ExCxD, *weights) -> y_ExCxD.


def _dispatch(x_TxD: jax.Array, slot_TxR: jax.Array, n_experts: int,
              capacity: int) -> jax.Array:
  (T, D), R = x_TxD.shape, slot_TxR.shape[1]
  # A scatter into E*C rows: a T x E x C one-hot would cost T*E*C memory.
  # Kept choices own distinct slots, so add == set; a dropped choice indexes
  # past the end and mode="drop" discards it.
  x_TxRxD = jnp.broadcast_to(x_TxD[:, None, :], (T, R, D))
  buffer = jnp.zeros((n_experts * capacity, D), x_TxD.dtype)
  buffer = buffer.at[slot_TxR].add(x_TxRxD, mode="drop")
  return buffer.reshape(n_experts, capacity, D)


def _combine(y_ExCxD: jax.Array, routing: Routing) -> jax.Array:
  y_ECxD = y_ExCxD.reshape(-1, y_ExCxD.shape[-1])
  # A dropped choice reads 0: the residual stream carries its token alone.
  y_TxRxD = y_ECxD.at[routing.slot_TxR].get(mode="fill", fill_value=0)
  return jnp.einsum("trd,tr->td", y_TxRxD,
                    routing.gate_TxR.astype(y_TxRxD.dtype))


def _group(x_TxD, router_DxE, weights, route: RouteFn, experts: ExpertFn,
           capacity: Callable[[int], int], G: int):
  """One group of tokens (one device's, inside the shard_map)."""
  (T, D), E = x_TxD.shape, router_DxE.shape[-1]
  M, C = E // G, capacity(T)
  routing = route(x_TxD, router_DxE, C)
  x_ExCxD = _dispatch(x_TxD, routing.slot_TxR, E, C)
  if G == 1:
    return _combine(experts(x_ExCxD, *weights), routing), routing.stats
  # Afterwards the leading axis is the source shard: this shard holds the
  # slots of its own M experts from every shard.
  x_GxMxCxD = jax.lax.all_to_all(x_ExCxD.reshape(G, M, C, D), AXIS, 0, 0,
                                 tiled=True)
  x_MxGCxD = x_GxMxCxD.swapaxes(0, 1).reshape(M, G * C, D)
  y_GxMxCxD = experts(x_MxGCxD, *weights).reshape(M, G, C, D).swapaxes(0, 1)
  y_GxMxCxD = jax.lax.all_to_all(y_GxMxCxD, AXIS, 0, 0, tiled=True)
  return _combine(y_GxMxCxD.reshape(E, C, D), routing), routing.stats


def apply(x_BxLxD: jax.Array, router_DxE: jax.Array,
          weights: Sequence[jax.Array], *, route: RouteFn, experts: ExpertFn,
          capacity: Callable[[int], int]
          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """y_BxLxD and the routing stats averaged over groups.

  `weights` are the experts' stacked weights (leading axis E); `experts`
  gets them sliced to the shard's own experts. `capacity(T)` is C for a
  group of T tokens. Call under the context mesh (`jax.set_mesh`).
  """
  B, L, D = x_BxLxD.shape
  E = router_DxE.shape[-1]
  run = functools.partial(_group, route=route, experts=experts,
                          capacity=capacity)
  mesh = jax.sharding.get_abstract_mesh()
  rules = rules_lib.current()
  batch = tuple(a for a in rules_lib.axis_names(rules.batch) if a in mesh.axis_names)
  length = tuple(a for a in rules_lib.axis_names(rules.length) if a in mesh.axis_names)
  G = 1 if mesh.empty else mesh.shape.get(AXIS, 1)
  splits = (math.prod(mesh.shape[a] for a in batch),
            math.prod(mesh.shape[a] for a in length))
  if G > 1 and (AXIS not in batch or E % G or B % splits[0]
                or L % splits[1]):
    raise ValueError(
        f"Expert parallelism over mesh.{AXIS}={G} needs {AXIS!r} in "
        f"rules.batch (got {rules.batch}), the {E} experts divisible by {G}, "
        f"and the batch ({B}) and length ({L}) divisible by their "
        f"{splits} shards.")
  if mesh.empty or not batch + length or B % splits[0] or L % splits[1]:
    # One group over all tokens (no mesh, or e.g. sampling one sequence).
    y_TxD, stats = run(x_BxLxD.reshape(B * L, D), router_DxE, tuple(weights),
                       G=1)
    return y_TxD.reshape(B, L, D), stats

  def local(x_bxlxD, router, weights):
    b, l, _ = x_bxlxD.shape
    y_TxD, stats = run(x_bxlxD.reshape(b * l, D), router, weights, G=G)
    # Stats leave per group and are averaged outside: a collective in here
    # would need care in its transpose (check_vma=False).
    return y_TxD.reshape(b, l, D), jax.tree.map(lambda s: s[None], stats)

  tokens = P(batch or None, length or None)
  y_BxLxD, stats_N = jax.shard_map(
      local, in_specs=(tokens, P(), P(AXIS if G > 1 else None)),
      out_specs=(tokens, P(batch + length)), axis_names=set(batch + length),
      check_vma=False)(x_BxLxD, router_DxE, tuple(weights))
  # Groups are equal in size, so the mean of their means is the global mean.
  return y_BxLxD, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats_N)
