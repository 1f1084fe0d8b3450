"""Context, pipeline and expert parallelism in the trainer: each strategy,
alone and combined with data/FSDP/tensor parallelism, trains the tiny LM to
the losses and parameters of one device, and its checkpoints restore onto
another mesh and train on from there."""
import math

import jax
import numpy as np
import pytest

from conftest import tiny_config
from lm import tasks
from lm.parallel import Rules, make_mesh, rules as rules_lib
from lm.train import checkpoint as ckpt_lib, state as state_lib
from lm.train import step as step_lib

STEPS = 3
ATOL = 1e-5  # As tests/test_parallel.py: Adam moves ~0-gradient weights.
# Capacity for every token at one expert (capacity_factor * top_k = experts),
# so nothing is dropped on any mesh and MoE equals its one-device run.
MOE = {"model.moe.experts": 8, "model.moe.capacity_factor": 4.0}
PIPE = {"model.scan_layers": True}

STRATEGIES = {
    "ring_sequence8": (dict(sequence=8), {}),
    "ring_data2_sequence4": (dict(data=2, sequence=4), {}),
    "ring_data2_sequence2_tensor2": (dict(data=2, sequence=2, tensor=2), {}),
    "allgather_fsdp2_sequence4": (dict(fsdp=2, sequence=4),
                                  {"model.context_parallel": "all_gather"}),
    "pipeline_data2_stage4": (dict(data=2, stage=4),
                              {**PIPE, "train.microbatches": 4}),
    "pipeline_data2_stage2_tensor2": (dict(data=2, stage=2, tensor=2),
                                      {**PIPE, "train.microbatches": 2}),
    "moe_expert8": (dict(expert=8), MOE),
    "moe_data2_expert2_tensor2": (dict(data=2, expert=2, tensor=2), MOE),
    "moe_scanned_fsdp2_expert4": (dict(fsdp=2, expert=4), {**MOE, **PIPE}),
}


def _config(overrides: dict):
  return tiny_config(**{"model.n_layers": 4, "train.steps": STEPS,
                        **overrides})


def _batches():
  rng = np.random.default_rng(0)
  return [{"tokens": rng.integers(0, 256, (16, 33)).astype(np.int32)}
          for _ in range(STEPS)]


def _run(config, mesh_shape: dict, batches, *, restore_from=None,
         save_to=None):
  """Steps through `batches` on `mesh_shape`; (metrics, host state)."""
  config.mesh = mesh_shape
  mesh = make_mesh(mesh_shape, jax.devices()[:math.prod(mesh_shape.values())])
  with jax.set_mesh(mesh), rules_lib.use(Rules()):
    setup = state_lib.make_setup(config, mesh)
    if restore_from:
      ckpt = ckpt_lib.Checkpointer(restore_from, async_save=False)
      state = ckpt.restore(setup.abstract_state)
      ckpt.close()
    else:
      state = setup.init_fn(jax.random.key(config.seed))
    fn = step_lib.jit_train_step(setup, tasks.get(config))
    history = []
    for b in batches:
      b = {k: jax.device_put(v, setup.batch_sharding(v.ndim, k))
           for k, v in b.items()}
      state, m = fn(state, b)
      history.append(jax.device_get(m))
    if save_to:
      ckpt = ckpt_lib.Checkpointer(save_to, async_save=False)
      ckpt.save(int(state.step), state)
      ckpt.close()
  return history, jax.device_get(state)


_REFERENCES = {}


def _reference(overrides: dict):
  """The one-device run of a strategy's config (cached per config)."""
  key = tuple(sorted(overrides.items()))
  if key not in _REFERENCES:
    _REFERENCES[key] = _run(_config(overrides), {}, _batches())
  return _REFERENCES[key]


def _assert_same(history, state, ref_history, ref_state):
  for key in ref_history[0]:
    np.testing.assert_allclose([h[key] for h in history],
                               [h[key] for h in ref_history], rtol=1e-5,
                               err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=ATOL),
               state.params, ref_state.params)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_equals_one_device(name):
  mesh_shape, overrides = STRATEGIES[name]
  history, state = _run(_config(overrides), mesh_shape, _batches())
  _assert_same(history, state, *_reference(overrides))
  if overrides.get("model.moe.experts"):
    assert all(h["moe_dropped_fraction"] == 0.0 for h in history)


# Save after 2 steps on one mesh, restore onto another, take the 3rd step
# there: the same as 3 uninterrupted steps on one device.
RESTORES = {
    "ring_to_fsdp_tensor": ("ring_data2_sequence4",
                            dict(data=2, fsdp=2, tensor=2)),
    "pipeline_to_ring": ("pipeline_data2_stage4", dict(data=2, sequence=4)),
    "tensor_to_pipeline": ("pipeline_data2_stage2_tensor2",
                           dict(fsdp=2, stage=2, tensor=2)),
    "moe_to_data": ("moe_data2_expert2_tensor2", dict(data=8)),
    "data_to_moe": ("moe_expert8", dict(data=2, expert=4)),
}


@pytest.mark.parametrize("name", list(RESTORES))
def test_checkpoint_moves_between_strategies(name, tmp_path):
  strategy, restore_mesh = RESTORES[name]
  save_mesh, overrides = STRATEGIES[strategy]
  if name.startswith("data_to"):  # The reverse direction.
    save_mesh, restore_mesh = restore_mesh, save_mesh
  batches = _batches()
  first, _ = _run(_config(overrides), save_mesh, batches[:2],
                  save_to=tmp_path)
  last, state = _run(_config(overrides), restore_mesh, batches[2:],
                     restore_from=tmp_path)
  _assert_same(first + last, state, *_reference(overrides))
