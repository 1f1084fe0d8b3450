"""The jitted init (lm/train/state.py). On a CPU it is compiled with fewer
LLVM optimizations, for compile time: every parameter and optimizer state
must still hold the bits of the same init compiled with XLA's defaults."""
import math

import jax
import numpy as np
import pytest

from conftest import FAMILIES, tiny_config
from lm import config as config_lib
from lm.parallel import make_mesh
from lm.train import state as state_lib

CASES = {
    "lm": (tiny_config, dict(data=2, fsdp=2, tensor=2)),
    "lm_moe_bf16_params": (lambda: tiny_config(**{
        "model.moe.experts": 4, "precision.param_dtype": "bfloat16"}),
                           dict(fsdp=2, expert=4)),
    "lm_lora": (lambda: tiny_config(**{"lora.rank": 4}),
                dict(data=2, fsdp=2, tensor=2)),
    **{name: (make, dict(data=2, fsdp=2)) for name, make in FAMILIES.items()},
}


@pytest.mark.parametrize("name", list(CASES))
def test_init_holds_the_bits_of_xlas_default_compile(name):
  make, mesh_shape = CASES[name]
  config = make()
  config.mesh = mesh_shape
  config = config_lib.resolve(config)
  mesh = make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape.values())])
  with jax.set_mesh(mesh):
    setup = state_lib.make_setup(config, mesh)
    assert state_lib.init_compiler_options(mesh)  # What this test is about.
    key = jax.random.key(config.seed)
    ours = jax.device_get(setup.init_fn(key))
    # XLA's default is level 3, named here: the suite's own XLA_FLAGS
    # compile everything else at level 0 (tests/conftest.py).
    default = jax.device_get(jax.jit(
        setup.init_fn.__wrapped__, out_shardings=setup.state_shardings,
        compiler_options={"xla_backend_optimization_level": 3})(key))
  leaves, ref_leaves = jax.tree.leaves(ours), jax.tree.leaves(default)
  assert len(leaves) == len(ref_leaves) > 2
  for a, b in zip(leaves, ref_leaves):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8),
                                  np.atleast_1d(b).view(np.uint8))
