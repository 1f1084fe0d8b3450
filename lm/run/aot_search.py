"""--search of scripts/aot_compile.py: many plans of one config on one TPU
slice (lm/run/aot.py), ranked by the compiler's estimate.

Which meshes, remat policies and microbatch counts are tried, in which
order, and what a bounded search leaves out, is `search`'s docstring; a
plan that does not fit stays in the ranking, after those that do.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

from lm import checks as base_checks
from lm.parallel import mesh as mesh_lib
from lm.run.aot import Plan, Target, describe_mesh, plan, row, validate

# Remat policies a search tries: least memory first; "dots" (which keeps
# the attention scores too) and "none" last.
REMATS = ("full", "dots_no_batch", "offload", "dots", "none")
SEARCH_AXES = ("data", "fsdp", "tensor", "stage", "sequence")


def meshes(devices: int, axes=SEARCH_AXES) -> list[dict[str, int]]:
  """Every way to split `devices` over `axes` (sizes whose product is
  `devices`), the others 1."""
  if not axes:
    return [{}] if devices == 1 else []
  first, rest = axes[0], axes[1:]
  return [{first: d, **m} for d in range(1, devices + 1) if devices % d == 0
          for m in meshes(devices // d, rest)]


def _prior(sizes: dict[str, int]) -> tuple:
  """The order a search compiles meshes in when it cannot compile them all:
  FSDP over every chip first (the presets' choice), then each other axis
  split 2 ways, then 4 ways, ..., so a short search sees every strategy.
  Within a size, those the compiler can estimate (data, tensor) come
  before those it cannot (sequence: ring attention's loop; stage: the
  pipeline's)."""
  others = {a: s for a, s in sizes.items() if a != "fsdp" and s > 1}
  order = ("data", "tensor", "sequence", "stage")
  return (math.prod(others.values()), len(others),
          sorted(order.index(a) for a in others))


def candidates(config, tgt: Target, axes=SEARCH_AXES) -> list:
  """(sizes, config) of every mesh over `axes` that passes the config
  checks on the slice, in the search's order; the remat and microbatches
  are the config's. A stage split runs 2 x stages pipeline microbatches."""
  out = []
  for sizes in sorted(meshes(len(tgt.devices), axes), key=_prior):
    c = copy.deepcopy(config)
    c.mesh.update({a: sizes.get(a, 1) for a in mesh_lib.AXES})
    if sizes.get("stage", 1) > 1:
      c.model.scan_layers = True
      c.train.microbatches = 2 * sizes["stage"]
    try:
      validate(c, tgt)
    except base_checks.ConfigError:
      continue
    out.append(c)
  return out


def search(config, tgt: Target, *, axes=SEARCH_AXES, remats=REMATS,
           accums=(1, 2, 4), max_compiles: int = 24,
           max_seconds: float = 3600.0, top: int = 2,
           log: Callable[[str], None] = print) -> tuple[list[Plan], int]:
  """Compiles (mesh, remat, microbatches) variants of `config` for `tgt`
  and ranks them. Round 1: every valid mesh (`candidates`) with the
  config's remat and microbatches, in the `_prior` order, for up to half
  the compiles. Round 2: on the `top` meshes of round 1
  (`_most_promising`), every remat, each with the fewest microbatches (of
  `accums`) that fit: more only repeat each weight's gathers; a remat
  whose activations would not fit even split over the most microbatches
  is left at that. Stops after `max_compiles` plans or `max_seconds`.
  Returns (the plans, ranked; how many candidates the budget left out)."""
  start, plans, probes = time.monotonic(), {}, {}
  left_out = 0

  def budget(limit: int = max_compiles) -> bool:
    compiled = sum(p is not None for p in plans.values())
    return compiled < limit and time.monotonic() - start < max_seconds

  def run(c) -> Plan | None:
    key = (tuple(c.mesh.items()), c.model.remat, c.train.grad_accum_steps)
    if key not in plans:
      try:
        plans[key] = plan(c, tgt, probes=probes)
      except base_checks.ConfigError as e:  # The batch does not split so.
        log(f"  skipped {describe_mesh(dict(c.mesh))} remat={c.model.remat}"
            f" accum={c.train.grad_accum_steps}: {e}")
        plans[key] = None
        return None
      compiled = sum(p is not None for p in plans.values())
      log(f"  [{compiled}] {row(plans[key])}")
    return plans[key]

  meshes_ = candidates(config, tgt, axes)
  log(f"search: {len(meshes_)} meshes pass the config checks on {tgt.name}")
  for i, c in enumerate(meshes_):
    if not budget(max(max_compiles // 2, 1)):
      left_out += len(meshes_) - i
      break
    run(c)
  for p in _most_promising(plans.values(), top):
    for remat in [r for r in remats if _runs_on_tpu(r)]:
      for accum in accums:
        if not budget():
          left_out += 1
          break
        c = copy.deepcopy(config)
        c.mesh.update(p.mesh)
        if p.mesh["stage"] > 1:
          c.model.scan_layers = True
          c.train.microbatches = 2 * p.mesh["stage"]
        c.model.remat, c.train.grad_accum_steps = remat, accum
        found = run(c)
        if found is not None and (found.fits or _hopeless(found, accum,
                                                           max(accums))):
          break
  return ranked(plans.values()), left_out


def _hopeless(p: Plan, accum: int, most: int) -> bool:
  """Whether even `most` microbatches cannot make `p` (at `accum`) fit:
  at best its activations shrink in proportion, its state not at all."""
  activations = max(p.needed_bytes - p.state_bytes, 0)
  return p.state_bytes + activations * accum / most > p.hbm_bytes


def _most_promising(plans, top: int) -> list[Plan]:
  """Round 2's meshes: those the compiler can estimate first (a variant of
  a mesh without an estimate cannot be ranked), then those that fit, then
  by the estimate or, short of one, by how close they came to fitting
  (more microbatches may make them fit)."""
  done = [p for p in plans if p is not None]
  return sorted(done, key=lambda p: (
      p.estimate_s is None, not p.fits,
      p.estimate_s if p.estimate_s is not None else p.needed_bytes))[:top]


def _runs_on_tpu(remat: str) -> bool:
  from lm.models import tuning  # noqa: PLC0415
  return "tpu" in tuning.REMAT_BACKENDS.get(remat, ("tpu",))


def ranked(plans) -> list[Plan]:
  """Fitting plans by the compiler's estimate, then fitting ones without
  one (by memory), then the rest."""
  return sorted((p for p in plans if p is not None), key=lambda p: (
      not p.fits, p.estimate_s is None,
      p.estimate_s if p.estimate_s is not None else p.needed_bytes))


