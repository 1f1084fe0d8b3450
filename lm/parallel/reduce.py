"""Explicit data-parallel gradient reduction, written with `jax.shard_map`.

By default XLA inserts the gradient all-reduce itself (one combined
all-reduce for plain data parallelism). `config.train.grad_reduce="psum"`
instead computes each data shard's gradients inside a `shard_map` that is
manual over the `data` axis only (fsdp and tensor stay automatic) and
averages them with an explicit `psum`, optionally in bfloat16
(`config.train.grad_reduce_dtype`), for researchers who study the
communication. The result is the same mean gradient.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.parallel import rules as rules_lib

MODES = ("auto", "psum")
DTYPES = ("float32", "bfloat16")


def _without_data(rules: rules_lib.Rules) -> rules_lib.Rules:
  """The rules inside the manual region, where `data` is not a mesh axis."""
  batch = rules.batch
  names = (batch,) if isinstance(batch, str) else tuple(batch or ())
  names = tuple(n for n in names if n != "data")
  return dataclasses.replace(rules, batch=names or None)


def explicit_grads(grad_fn, params, batch: dict, key, *, mesh, rules,
                   dtype: str = "float32"):
  """grad_fn(params, batch, key) -> ((loss, metrics), grads), evaluated per
  data shard and averaged over `data` with an explicit psum in `dtype`."""
  n = mesh.shape["data"]
  comm = jnp.dtype(dtype)
  inner = _without_data(rules)

  def local(params, batch, key):
    with rules_lib.use(inner):
      (loss, metrics), g = grad_fn(params, batch, key)
    # Equal shards: the mean of the shards' means is the batch mean.
    g = jax.tree.map(
        lambda x: (jax.lax.psum(x.astype(comm), "data") / n).astype(x.dtype),
        g)
    loss, metrics = jax.lax.pmean((loss, metrics), "data")
    return (loss, metrics), g

  replicated = jax.tree.map(lambda _: P(), params)
  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(replicated, jax.tree.map(lambda _: P("data"), batch), P()),
      out_specs=((P(), P()), replicated), axis_names={"data"},
      check_vma=False)(params, batch, key)
