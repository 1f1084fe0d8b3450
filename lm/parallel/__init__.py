"""Meshes, the logical-axis rules table, and sharding helpers."""
from lm.parallel.mesh import AXES, axis_size, make_mesh, resolve_shape
from lm.parallel.rules import Rules, constrain, current, tree_specs, use
