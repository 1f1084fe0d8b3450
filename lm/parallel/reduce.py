"""Explicit data-parallel gradient reduction, written with `jax.shard_map`.

By default XLA inserts the gradient all-reduce itself (one combined
all-reduce for plain data parallelism). `config.train.grad_reduce` set to
"psum" or "reduce_scatter" instead computes each data shard's gradients
inside a `shard_map` that is manual over the `data` axis and averages them
with explicit collectives, optionally in bfloat16
(`config.train.grad_reduce_dtype`), for researchers who study the
communication:

  psum            one all-reduce per gradient;
  reduce_scatter  the all-reduce's two halves written out: each gradient is
                  flattened, `psum_scatter`ed so every data shard sums 1/n of
                  it, then `all_gather`ed back (what a ring all-reduce does
                  inside; the place to hook in sharded optimizer updates or
                  compression of the scattered part).

The result is the same mean gradient.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm import backend as backend_lib, checks
from lm.parallel import mesh as mesh_lib, rules as rules_lib

MODES = ("auto", "psum", "reduce_scatter")
DTYPES = ("float32", "bfloat16")


def check(train_cfg, mesh: dict[str, int]) -> None:
  """config.train.grad_reduce and grad_reduce_dtype against the mesh and
  the backend."""
  mode, dtype = train_cfg.grad_reduce, train_cfg.grad_reduce_dtype
  checks.one_of(mode, MODES, "config.train.grad_reduce")
  checks.one_of(dtype, DTYPES, "config.train.grad_reduce_dtype")
  # A shard_map manual over `data` with fsdp/tensor left automatic makes
  # XLA's SPMD partitioner abort the process (jax 0.10.2), so the explicit
  # reduction is for pure data parallelism for now.
  others = [a for a in mesh_lib.AXES if a != "data" and mesh[a] != 1]
  checks.require(
      mode == "auto" or not others,
      f"config.train.grad_reduce={mode!r} needs config.mesh."
      f"{others[0] if others else 'fsdp'}=1: the explicit reduction is for "
      "pure data parallelism (every other mesh axis 1); use 'auto' with "
      "FSDP, tensor, sequence, stage or expert parallelism.")
  # XLA:CPU aborts the process (not an exception) compiling a bfloat16
  # all-reduce, so this cannot be probed; it is refused up front.
  checks.require(mode == "auto" or dtype == "float32"
                 or backend_lib.name() != "cpu",
                 "config.train.grad_reduce_dtype='bfloat16': XLA:CPU cannot "
                 "compile bfloat16 all-reduces; use 'float32' on CPU "
                 "(bfloat16 communication is for GPU/TPU).")


def _without_data(rules: rules_lib.Rules) -> rules_lib.Rules:
  """The rules inside the manual region, where `data` is not a mesh axis."""
  names = tuple(n for n in rules_lib.axis_names(rules.batch) if n != "data")
  return dataclasses.replace(rules, batch=names or None)


def _psum_mean(x: jax.Array, n: int, comm) -> jax.Array:
  return (jax.lax.psum(x.astype(comm), "data") / n).astype(x.dtype)


def _reduce_scatter_mean(x: jax.Array, n: int, comm) -> jax.Array:
  flat = x.astype(comm).reshape(-1)
  pad = -flat.size % n  # psum_scatter splits the flat gradient n ways.
  flat = jnp.pad(flat, (0, pad))
  part = jax.lax.psum_scatter(flat, "data", scatter_dimension=0,
                              tiled=True) / n
  whole = jax.lax.all_gather(part, "data", axis=0, tiled=True)
  return whole[:x.size].reshape(x.shape).astype(x.dtype)


def explicit_grads(grad_fn, params, batch: dict, key, *, mesh,
                   dtype: str = "float32", mode: str = "psum"):
  """grad_fn(params, batch, key) -> ((loss, metrics), grads), evaluated per
  data shard and averaged over `data` with explicit collectives (`mode`:
  psum or reduce_scatter) in `dtype`."""
  n = mesh.shape["data"]
  comm = jnp.dtype(dtype)
  inner = _without_data(rules_lib.current())
  reduce = {"psum": _psum_mean, "reduce_scatter": _reduce_scatter_mean}[mode]

  def local(params, batch, key):
    with rules_lib.use(inner):
      (loss, metrics), g = grad_fn(params, batch, key)
    # Equal shards: the mean of the shards' means is the batch mean.
    g = jax.tree.map(lambda x: reduce(x, n, comm), g)
    loss, metrics = jax.lax.pmean((loss, metrics), "data")
    return (loss, metrics), g

  replicated = jax.tree.map(lambda _: P(), params)
  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(replicated, jax.tree.map(lambda _: P("data"), batch), P()),
      out_specs=((P(), P()), replicated), axis_names={"data"},
      check_vma=False)(params, batch, key)
