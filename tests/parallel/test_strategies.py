"""Context, pipeline and expert parallelism in the trainer: each strategy,
alone and combined with data/FSDP/tensor parallelism, trains the tiny LM to
the losses and parameters of one device, and its checkpoints restore onto
another mesh and train on from there."""
import numpy as np
import pytest

from conftest import assert_same_run, run_steps, tiny_config

STEPS = 3
# Capacity for every token at one expert (capacity_factor * top_k = experts),
# so nothing is dropped on any mesh and MoE equals its one-device run.
MOE = {"model.moe.experts": 8, "model.moe.capacity_factor": 4.0}
# Experts that see few tokens have many weights with gradients at rounding
# level, which Adam moves by up to +-lr whatever the summation order (see
# tests/parallel/test_parallel.py). Measured: one weight of 65,536 in expert 7 off by
# 1.3e-5 on data2 x expert2 x tensor2 (the chunked attention's float
# rounding); so MoE parameters get 5e-3 of one step (lr 1e-2) as atol.
MOE_ATOL = 5e-5


def _atol(overrides: dict) -> float:
  return MOE_ATOL if overrides.get("model.moe.experts") else 1e-5
PIPE = {"model.scan_layers": True}

STRATEGIES = {
    "ring_sequence8": (dict(sequence=8), {}),
    "ring_data2_sequence4": (dict(data=2, sequence=4), {}),
    "ring_data2_sequence2_tensor2": (dict(data=2, sequence=2, tensor=2), {}),
    "allgather_fsdp2_sequence4": (dict(fsdp=2, sequence=4),
                                  {"model.context_parallel": "all_gather"}),
    "pipeline_data2_stage4": (dict(data=2, stage=4),
                              {**PIPE, "train.microbatches": 4,
                               "model.n_layers": 4}),
    "pipeline_data2_stage2_tensor2": (dict(data=2, stage=2, tensor=2),
                                      {**PIPE, "train.microbatches": 2}),
    "moe_expert8": (dict(expert=8), MOE),
    "moe_data2_expert2_tensor2": (dict(data=2, expert=2, tensor=2), MOE),
    "moe_scanned_fsdp2_expert4": (dict(fsdp=2, expert=4), {**MOE, **PIPE}),
}


def _config(overrides: dict):
  """tiny_config's 2 layers (4 for 4 pipeline stages): every strategy acts
  on each layer alike, and each unrolled layer adds compile time."""
  return tiny_config(**{"train.steps": STEPS, **overrides})


def _batches():
  rng = np.random.default_rng(0)
  return [{"tokens": rng.integers(0, 256, (16, 33)).astype(np.int32)}
          for _ in range(STEPS)]


def _run(config, mesh_shape: dict, batches, **checkpoints):
  """(metrics per step, host state); `checkpoints`: restore_from, save_to."""
  return run_steps(config, mesh_shape, batches, **checkpoints)[:2]


_REFERENCES = {}


def _reference(overrides: dict):
  """The one-device run of a strategy's config (cached per config)."""
  key = tuple(sorted(overrides.items()))
  if key not in _REFERENCES:
    _REFERENCES[key] = _run(_config(overrides), {}, _batches())
  return _REFERENCES[key]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_equals_one_device(name):
  mesh_shape, overrides = STRATEGIES[name]
  history, state = _run(_config(overrides), mesh_shape, _batches())
  assert_same_run(history, state, *_reference(overrides),
                  atol=_atol(overrides))
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
  assert_same_run(first + last, state, *_reference(overrides),
                  atol=_atol(overrides))
