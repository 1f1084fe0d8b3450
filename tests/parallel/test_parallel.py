"""Every sharding strategy computes what one device computes."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from lm import tasks
from lm.parallel import Rules, make_mesh, rules as rules_lib
from lm.train import state as state_lib, step as step_lib

# Parameters after 3 Adam steps: rtol 1e-5, plus an absolute floor of 1e-3 of
# one step's size (lr=1e-2). Adam divides by sqrt(v): a weight whose gradient
# is at float32 rounding level moves by up to +-lr whatever the summation
# order, so a few such weights differ by ~1e-6 between reduction orders.
ATOL = 1e-5

MESHES = [
    dict(data=1, fsdp=1, tensor=1),
    dict(data=8, fsdp=1, tensor=1),
    dict(data=1, fsdp=8, tensor=1),
    dict(data=2, fsdp=2, tensor=2),
    dict(data=2, fsdp=1, tensor=4),
]


def _train(mesh_shape, steps=3, **overrides):
  config = tiny_config(mesh=mesh_shape, **overrides)
  config.train.steps = steps
  n = int(np.prod(list(mesh_shape.values())))
  mesh = make_mesh(mesh_shape, jax.devices()[:n])
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 256, (16, 33)).astype(np.int32)
             for _ in range(steps)]
  with jax.set_mesh(mesh), rules_lib.use(Rules()):
    setup = state_lib.make_setup(config, mesh)
    state = setup.init_fn(jax.random.key(0))
    fn = step_lib.jit_train_step(setup, tasks.get(config),
                                 config.train.grad_accum_steps)
    losses = []
    for b in batches:
      state, m = fn(state, {"tokens": jax.device_put(b,
                                                     setup.batch_sharding())})
      losses.append(float(m["loss"]))
  return np.array(losses), jax.tree.map(np.asarray, state.params), state


@pytest.fixture(scope="module")
def reference():
  return _train(MESHES[0])


@pytest.mark.parametrize("mesh_shape", MESHES[1:], ids=str)
def test_sharded_equals_single_device(mesh_shape, reference):
  ref_losses, ref_params, _ = reference
  losses, params, _ = _train(mesh_shape)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=ATOL),
               params, ref_params)
  assert not np.allclose(ref_params["transformer"]["embedding"],
                         _train(MESHES[0], steps=1)[1]["transformer"]
                         ["embedding"]), "training must move the parameters"


def test_grad_accumulation_equals_full_batch(reference):
  ref_losses, ref_params, _ = reference
  losses, params, _ = _train(dict(data=2, fsdp=2, tensor=2),
                             **{"train.grad_accum_steps": 2})
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=ATOL),
               params, ref_params)


def test_param_shardings_follow_rules_table():
  *_, state = _train(dict(data=2, fsdp=2, tensor=2), steps=1)
  params = state.params
  block = params["transformer"]["blocks"][0]
  expect = {
      "embedding": (params["transformer"]["embedding"], P("tensor", "fsdp")),
      "q": (block["attn"]["q"]["kernel"], P("fsdp", "tensor", None)),
      "k": (block["attn"]["k"]["kernel"], P("fsdp", "tensor", None)),
      "o": (block["attn"]["o"]["kernel"], P("tensor", None, "fsdp")),
      "gate": (block["mlp"]["gate"]["kernel"], P("fsdp", "tensor")),
      "down": (block["mlp"]["down"]["kernel"], P("tensor", "fsdp")),
      "norm": (block["attn_norm"]["scale"], P(None)),
  }
  for name, (array, spec) in expect.items():
    assert array.sharding.spec == spec, name
    # ZeRO-3: a (2,2,2) mesh stores 1/(fsdp*tensor) of a 2-D weight per device.
    if len([a for a in spec if a]) == 2:
      shard = array.addressable_shards[0].data
      assert shard.size * 4 == array.size, name
  # Adam moments are sharded exactly like their parameters.
  mu = state.opt_state[1].mu  # chain: clip, adam, decay, lr.
  assert (mu["transformer"]["blocks"][0]["mlp"]["down"]["kernel"]
          .sharding.spec == P("tensor", "fsdp"))


def test_scanned_layers_shard_with_a_layers_axis():
  *_, state = _train(dict(data=2, fsdp=2, tensor=2), steps=1,
                     **{"model.scan_layers": True, "model.remat": "full"})
  q = state.params["transformer"]["blocks"]["attn"]["q"]["kernel"]
  assert q.shape[0] == 2 and q.sharding.spec == P("stage", "fsdp", "tensor", None)
