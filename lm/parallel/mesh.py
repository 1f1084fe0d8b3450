"""Builds the device mesh from `config.mesh`."""
from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from lm import checks
from lm.parallel import rules as rules_lib

# Order matters: data-like axes first so that on real hardware the innermost
# (fastest interconnect) axes carry the most traffic: tensor parallelism's
# per-layer all-reduces, then the ring attention's per-layer ppermutes and
# the experts' all_to_alls. Pipeline stages exchange one activation per
# microbatch, so `stage` can span slower links, next to `data`.
AXES = ("data", "stage", "fsdp", "expert", "sequence", "tensor")


def resolve_shape(mesh_config: Mapping[str, int], num_devices: int,
                  axes: Sequence[str] = AXES) -> dict[str, int]:
  """Fills in the single -1 axis so the product equals `num_devices`.

  Raises ValueError naming `config.mesh.*` when that is impossible.
  """
  sizes = {a: int(mesh_config.get(a, 1)) for a in axes}
  unknown = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise checks.ConfigError(f"config.mesh.{bad[0]}={sizes[bad[0]]}: mesh axis sizes "
                     "must be positive, or -1 for 'all remaining devices'.")
  if len(unknown) > 1:
    raise checks.ConfigError(f"config.mesh: only one axis may be -1, got {unknown}; "
                     "set all but one to explicit sizes.")
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    if num_devices % known:
      raise checks.ConfigError(
          f"config.mesh: the fixed axes multiply to {known}, which does not "
          f"divide the {num_devices} devices, so config.mesh.{unknown[0]}=-1 "
          "cannot be filled in; pick sizes whose product divides "
          f"{num_devices}.")
    sizes[unknown[0]] = num_devices // known
  elif known != num_devices:
    shape = ", ".join(f"{a}={s}" for a, s in sizes.items())
    raise checks.ConfigError(
        f"config.mesh: {shape} multiplies to {known} but there are "
        f"{num_devices} devices; make the product {num_devices}, or set one "
        "axis to -1 to use all remaining devices.")
  return sizes


def check(mesh_config: Mapping[str, int], num_devices: int,
          process_count: int = 1) -> dict[str, int]:
  """config.mesh against the devices: the resolved axis sizes, or a
  ConfigError naming the key."""
  try:
    return resolve_shape(mesh_config, num_devices)
  except ValueError as e:
    where = (f" (the mesh spans all {process_count} processes: "
             f"{num_devices} devices in all, {num_devices // process_count} "
             "per process)" if process_count > 1 else "")
    raise checks.ConfigError(str(e) + where) from None


def make_mesh(mesh_config: Mapping[str, int],
              devices: Sequence[jax.Device] | None = None,
              dcn: Mapping[str, int] | None = None) -> Mesh:
  """A mesh over all (or the given) devices with axes `AXES`.

  `dcn` (config.mesh_dcn) says how many slices an axis spans: on a TPU
  multislice job, e.g. {"data": 4} over 4 slices makes `data` cross the
  data-center network 4 ways and keeps every other axis inside a slice's ICI.
  Slices are the devices' `slice_index`; where all devices report one slice
  (GPU, CPU) each process counts as a slice. Without `dcn`, devices are laid out
  process-major, so the first axes (data, stage) are the ones that span
  hosts.

  Axis types are Auto: shardings are propagated by XLA from the in/out
  shardings and our `with_sharding_constraint` hints. (jax 0.10 defaults to
  Explicit axes, under which every sharded contraction would need an explicit
  `out_sharding`.)
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  types = (AxisType.Auto,) * len(AXES)
  unknown = set(dcn or {}) - set(AXES)
  if unknown:
    raise checks.ConfigError(f"config.mesh_dcn.{sorted(unknown)[0]}: not a mesh axis; "
                     f"use one of {AXES}.")
  dcn = {a: int(s) for a, s in (dcn or {}).items() if int(s) != 1}
  if not dcn:
    # On a TPU slice the devices are laid out along its torus; an axis that
    # is no product of whole torus axes (data=2 x fsdp=64 on a 4x4x8 v5p)
    # splits one, where jax.make_mesh would refuse the mesh.
    grid = mesh_utils.create_device_mesh(shape, devices,
                                         allow_split_physical_axes=True)
    return Mesh(grid, AXES, axis_types=types)
  # CPU and GPU devices report slice 0 (or nothing): processes are the units.
  by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
  slices = len({d.slice_index if by_slice else d.process_index
                for d in devices})
  dcn_shape = tuple(dcn.get(a, 1) for a in AXES)
  unit = "slices" if by_slice else "processes"
  if math.prod(dcn_shape) != slices:
    raise checks.ConfigError(
        f"config.mesh_dcn={dcn} spans {math.prod(dcn_shape)} {unit}, but the "
        f"devices are in {slices} {unit}: make the product {slices}.")
  for axis, n in dcn.items():
    if sizes[axis] % n:
      raise checks.ConfigError(
          f"config.mesh_dcn.{axis}={n} does not divide config.mesh.{axis}="
          f"{sizes[axis]}: each of the {n} {unit} needs an equal part.")
  ici_shape = tuple(s // d for s, d in zip(shape, dcn_shape))
  grid = mesh_utils.create_hybrid_device_mesh(
      ici_shape, dcn_shape, devices, process_is_granule=not by_slice,
      allow_split_physical_axes=True)
  return Mesh(grid, AXES, axis_types=types)


def describe(mesh: Mesh) -> str:
  """e.g. "data=2 x fsdp=2 x tensor=2": the axes that split something."""
  used = {n: s for n, s in mesh.shape.items() if s > 1} or {"data": 1}
  return " x ".join(f"{name}={size}" for name, size in used.items())


def axis_size(name: str) -> int:
  """The size of a mesh axis in the current (abstract) mesh; 1 without a
  mesh or when the mesh lacks the axis. Model code branches on this (e.g.
  ring attention when `sequence` > 1), so a strategy is the mesh shape."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or name not in mesh.axis_names:
    return 1
  return int(mesh.shape[name])


def batch_divisor(mesh: Mesh | Mapping[str, int]) -> int:
  """How many ways the rules table splits the batch dimension (by default
  data x fsdp x expert)."""
  shape = mesh.shape if isinstance(mesh, Mesh) else mesh
  batch = rules_lib.axis_names(rules_lib.current().batch)
  return int(np.prod([shape.get(a, 1) for a in batch]))


class ShareError(checks.UserError, ValueError):
  pass


def share_of(shards_by_process: Mapping[int, set[int]], process: int,
             num_shards: int) -> tuple[int, int]:
  """(index, count) such that this process feeds rows
  [index*B/count, (index+1)*B/count) of every global batch of B rows.

  `shards_by_process` maps every process to the batch shards (0 ..
  num_shards-1) its devices hold. Processes that hold the same shards feed the
  same rows; the shards must form equal, contiguous, aligned blocks.
  """
  mine = sorted(shards_by_process[process])
  size = len(mine)
  block = set(range(mine[0], mine[0] + size))
  blocks = {frozenset(s) for s in shards_by_process.values()}
  aligned = all(
      len(b) == size and min(b) % size == 0 and
      set(b) == set(range(min(b), min(b) + size)) for b in blocks)
  if set(mine) != block or not aligned or num_shards % size:
    raise ShareError(
        "config.mesh: the batch axes (data, fsdp, expert) give the processes "
        "interleaved or unequal parts of the batch "
        f"({ {p: sorted(s) for p, s in shards_by_process.items()} }); keep "
        "the axes that span hosts (data, stage) first in the mesh, as "
        "lm.parallel.mesh.AXES orders them, with sizes that divide per host.")
  return mine[0] // size, num_shards // size


def batch_share(mesh: Mesh) -> tuple[int, int]:
  """This process's share of every global batch, as `share_of` describes.

  One process: (0, 1). Two processes splitting `data`: (0, 2) and (1, 2).
  A batch axis that lives inside each host (e.g. tensor across hosts, data
  within) gives (0, 1) to every process: each feeds the whole batch.
  """
  return _batch_share(mesh, rules_lib.axis_names(rules_lib.current().batch))


@functools.lru_cache(maxsize=None)
def _batch_share(mesh: Mesh, batch: tuple[str, ...]) -> tuple[int, int]:
  n = int(np.prod([mesh.shape[a] for a in batch]))
  sharding = jax.sharding.NamedSharding(mesh, jax.P(batch or None))
  shards: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map((n,)).items():
    shards.setdefault(device.process_index, set()).add(index[0].start or 0)
  return share_of(shards, jax.process_index(), n)
