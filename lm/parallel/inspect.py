"""What a sharding strategy costs, before launching it: each parameter's
partition spec and bytes per device, and the collectives XLA put in the
compiled train step (scripts/inspect_sharding.py prints these; the step is
compiled by lm/train/step.py's compile_train_step).

Everything works from abstract arrays (no parameter is allocated, no data is
read), so a pod-sized config can be inspected on a laptop with simulated
devices of the same count.
"""
from __future__ import annotations

import collections
import math
import re

import jax

# HLO op names of the collectives; async pairs (-start/-done) count once.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")


def _path(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _device_bytes(x) -> int:
  shard = x.sharding.shard_shape(x.shape)
  return math.prod(shard) * x.dtype.itemsize


def parameter_table(abstract_params) -> list[dict]:
  """One row per parameter: path, shape, dtype, mesh spec, total bytes and
  bytes on each device."""
  rows = []
  for path, x in jax.tree_util.tree_leaves_with_path(abstract_params):
    rows.append({"path": _path(path), "shape": tuple(x.shape),
                 "dtype": x.dtype.name, "spec": tuple(x.sharding.spec),
                 "bytes": x.size * x.dtype.itemsize,
                 "device_bytes": _device_bytes(x)})
  return rows


def state_bytes(abstract_tree) -> tuple[int, int]:
  """(total bytes, bytes per device) of a tree of sharded abstract arrays."""
  leaves = jax.tree.leaves(abstract_tree)
  return (sum(x.size * x.dtype.itemsize for x in leaves),
          sum(_device_bytes(x) for x in leaves))


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective ops in compiled HLO text, by kind (an async start/done pair
  is one collective)."""
  counts = collections.Counter()
  for line in hlo_text.splitlines():
    for kind in COLLECTIVES:
      # "%x = <type> all-reduce(" or "all-reduce-start(" (not "-done(").
      if re.match(rf"\s*(ROOT )?%\S+ = .* {kind}(-start)?\(", line):
        counts[kind] += 1
  return dict(counts)
