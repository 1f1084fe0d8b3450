"""Logical axis names -> mesh axes: the only place logical names are mapped.

Parameters and activations are annotated with logical names (see the table
below); a strategy is a choice of mesh shape plus this table, never model code.

Letters used in tensor names across the project:
  B batch, L length (query), S length (key/value, cache), D model width,
  F mlp hidden, H query heads, N kv heads, K head dim, V vocab.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None


def axis_names(axes: MeshAxes) -> tuple[str, ...]:
  """A table entry as a tuple of mesh axis names ("fsdp" -> ("fsdp",))."""
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


@dataclasses.dataclass(frozen=True)
class Rules:
  """Logical axis -> mesh axis. The field names are the logical axis names.

  Parameters: `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`,
  `norm`, `layers`, `experts`, `classes`, `kernel_space` (conv kernels are named
  (kernel_space, kernel_space, embed, mlp): input channels FSDP, output
  channels tensor). Activations use the `act_*` names, which differ from the
  parameter names because FSDP shards a weight's `embed` dimension but never an
  activation's.
  """
  # Parameters.
  embed: MeshAxes = "fsdp"  # ZeRO-3: every weight is split over fsdp ...
  mlp: MeshAxes = "tensor"  # ... and Megatron splits the MLP hidden ...
  heads: MeshAxes = "tensor"  # ... and the attention heads over tensor.
  kv_heads: MeshAxes = "tensor"
  head_dim: MeshAxes = None
  vocab: MeshAxes = "tensor"
  norm: MeshAxes = None  # Norm scales are tiny: replicate them.
  layers: MeshAxes = "stage"  # Stacked layers: contiguous runs per stage.
  experts: MeshAxes = "expert"  # A mixture-of-experts layer's expert axis.
  classes: MeshAxes = None  # A classifier head's 4-10 outputs: replicate.
  kernel_space: MeshAxes = None  # A conv kernel's height and width.
  # Activations.
  # The expert axis is a data axis outside the MoE layers (as in GShard).
  batch: MeshAxes = ("data", "fsdp", "expert")
  length: MeshAxes = "sequence"  # Context parallelism: ring attention.
  act_embed: MeshAxes = None
  act_mlp: MeshAxes = "tensor"
  act_heads: MeshAxes = "tensor"
  act_kv_heads: MeshAxes = "tensor"
  act_vocab: MeshAxes = "tensor"

  def __call__(self, *names: str | None) -> P:
    return P(*(self.mesh_axes(n) for n in names))

  def mesh_axes(self, name: str | None) -> MeshAxes:
    if name is None:
      return None
    if not hasattr(self, name):
      raise KeyError(f"Unknown logical axis name {name!r}; known: "
                     f"{[f.name for f in dataclasses.fields(self)]}.")
    return getattr(self, name)

  def spec(self, logical: P | tuple | None) -> P:
    """A logical PartitionSpec (as stored in parameter metadata) -> mesh spec."""
    if logical is None:
      return P()
    return self(*logical)


# The one way to reach the table: `current()`. A run installs its table once
# with `use` (lm/run/loop.py); code that needs another one for a while (the
# replicated batch of sampling, the manual `data` axis of an explicit
# gradient reduction) installs it with `use` around that code. Without `use`
# the default table applies.
_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar(
    "lm_rules", default=Rules())


def current() -> Rules:
  return _RULES.get()


@contextlib.contextmanager
def use(rules: Rules):
  """Makes `rules` the table `current()` returns inside the block."""
  token = _RULES.set(rules)
  try:
    yield rules
  finally:
    _RULES.reset(token)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """Constrains an activation's sharding by logical names.

  A no-op when no mesh is active (e.g. a model called eagerly in a unit test),
  so model code can call it unconditionally.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, current()(*names))


def tree_specs(logical_specs: Any) -> Any:
  """Maps a tree of logical PartitionSpecs to a tree of mesh PartitionSpecs."""
  rules = current()
  return jax.tree.map(rules.spec, logical_specs,
                      is_leaf=lambda x: isinstance(x, P) or x is None)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Replicates a dimension its mesh axes do not divide evenly (e.g. a
  1-channel conv input, a 10-class head under tensor=4): jit shardings must
  divide, and such small dimensions gain nothing from splitting."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = axis_names(axes)
    ways = int(np.prod([mesh.shape[a] for a in names]))
    fitted.append(axes if dim % ways == 0 else None)
  return P(*fitted)


def param_sharding(mesh: Mesh, logical: P | None,
                   shape: tuple[int, ...]) -> NamedSharding:
  """A parameter's sharding: its logical names through the current table,
  fitted to its shape."""
  return NamedSharding(mesh, fit_spec(current().spec(logical), shape, mesh))
