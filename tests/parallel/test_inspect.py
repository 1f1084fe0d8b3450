"""What each strategy costs, from compiled programs: bytes per device and the
collectives XLA inserts, against the counts the theory predicts."""
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import REPO, tiny_config, xla_flags
from lm import tasks
from lm.parallel import inspect, make_mesh, rules as rules_lib
from lm.train import state as state_lib, step as step_lib

N_LAYERS = 2  # tiny_config.
WEIGHTS = 7 * N_LAYERS + 1  # q, k, v, o, gate, up, down per layer + embedding.


def _setup(mesh_shape, **overrides):
  config = tiny_config(mesh=mesh_shape, **overrides)
  n = math.prod(mesh_shape.values())
  mesh = make_mesh(mesh_shape, jax.devices()[:n])
  return config, mesh


def _forward_collectives(mesh_shape) -> dict[str, int]:
  config, mesh = _setup(mesh_shape)
  with jax.set_mesh(mesh), rules_lib.use(rules_lib.Rules()):
    setup = state_lib.make_setup(config, mesh)
    tokens = jax.ShapeDtypeStruct((16, 32), jnp.int32,
                                  sharding=setup.batch_sharding())
    fn = jax.jit(lambda p, t: nnx.merge(setup.graphdef, p)(t)[0])
    hlo = fn.lower(setup.abstract_state.params, tokens).compile().as_text()
  return inspect.count_collectives(hlo)


def _loss_collectives(mesh_shape, **overrides) -> dict[str, int]:
  """Collectives in the compiled LM loss (forward only)."""
  config, mesh = _setup(mesh_shape, **overrides)
  task = tasks.get(config)
  with jax.set_mesh(mesh), rules_lib.use(rules_lib.Rules()):
    setup = state_lib.make_setup(config, mesh)
    tokens = jax.ShapeDtypeStruct((16, 33), jnp.int32,
                                  sharding=setup.batch_sharding())
    fn = jax.jit(lambda p, t: task.loss(nnx.merge(setup.graphdef, p),
                                        {"tokens": t}, None)[0])
    hlo = fn.lower(setup.abstract_state.params, tokens).compile().as_text()
  return inspect.count_collectives(hlo)


@pytest.mark.parametrize("n", [4, 8])
def test_ring_attention_only_passes_blocks_around_the_ring(n):
  # Forward, per layer: K, V and the key positions, each as its two zig-zag
  # halves, are ppermuted inside the ring loop (a scan, so the op count does
  # not grow with n; at n = 2 XLA unrolls the one-step loop and shares the
  # layers' identical position hops, hence n >= 4 here): 6. Backward: those 6 plus dK and dV's halves (10) in
  # the loop, then dK and dV's last hop home (4). Nothing is gathered; the
  # one all-reduce is the mean of the loss over the sharded length.
  assert _loss_collectives(dict(sequence=n)) == {
      "collective-permute": 6 * N_LAYERS, "all-reduce": 1}
  _, step = _train_step(dict(sequence=n))
  assert step["collective-permute"] == (6 + 10 + 4) * N_LAYERS, step
  assert "all-gather" not in step, step


def test_all_gather_attention_gathers_keys_and_values():
  # Per layer K and V (2); the key positions are the same for every layer
  # (1, shared). Backward: a reduce-scatter each for dK and dV.
  overrides = {"model.context_parallel": "all_gather"}
  assert _loss_collectives(dict(sequence=8), **overrides) == {
      "all-gather": 2 * N_LAYERS + 1, "all-reduce": 1}
  _, step = _train_step(dict(sequence=8), **overrides)
  assert step["reduce-scatter"] == 2 * N_LAYERS, step


@pytest.mark.parametrize("mesh_shape", [dict(expert=8),
                                        dict(data=2, expert=4)], ids=str)
def test_experts_dispatch_and_combine_with_all_to_all(mesh_shape):
  # Per MoE layer: one all-to-all to send tokens to their experts' shards and
  # one to bring the results back; the backward transposes both. No
  # all-gather: the expert weights stay on their shard.
  overrides = {"model.moe.experts": 8}
  fwd = _loss_collectives(mesh_shape, **overrides)
  assert fwd["all-to-all"] == 2 * N_LAYERS and "all-gather" not in fwd, fwd
  _, step = _train_step(mesh_shape, **overrides)
  assert step["all-to-all"] == 4 * N_LAYERS, step


@pytest.mark.parametrize("stages", [2, 4])
def test_pipeline_passes_activations_between_stages(stages):
  # GPipe: one ppermute to the next stage per tick (inside the tick loop, so
  # one op whatever the microbatch count), reversed in the backward; the
  # last stage's outputs reach every stage by one masked psum (all-reduce).
  overrides = {"model.scan_layers": True, "model.n_layers": 4,
               "train.microbatches": 4}
  assert _loss_collectives(dict(stage=stages), **overrides) == {
      "collective-permute": 1, "all-reduce": 1}
  _, step = _train_step(dict(stage=stages), **overrides)
  assert step["collective-permute"] == 2, step


def test_tensor_parallel_forward_reduces_once_per_attention_and_mlp():
  # Megatron: the o and down projections' partial sums are all-reduced; the
  # embedding table is gathered whole before the lookup (transformer.py).
  assert _forward_collectives(dict(data=1, fsdp=1, tensor=2)) == {
      "all-reduce": 2 * N_LAYERS, "all-gather": 1}


def test_fsdp_forward_gathers_each_weight_once():
  assert _forward_collectives(dict(data=1, fsdp=8, tensor=1)) == {
      "all-gather": WEIGHTS}


def _train_step(mesh_shape, **overrides):
  setup, hlo = _train_step_hlo(mesh_shape, **overrides)
  return setup, inspect.count_collectives(hlo)


def _train_step_hlo(mesh_shape, **overrides):
  config, mesh = _setup(mesh_shape, **overrides)
  with jax.set_mesh(mesh), rules_lib.use(rules_lib.Rules()):
    setup = state_lib.make_setup(config, mesh)
    compiled = step_lib.compile_train_step(setup, tasks.get(config))
  return setup, compiled.as_text()


def _result_types(hlo: str, kind: str) -> list[str]:
  """The result type of each `kind` collective, e.g. "f32[]" or a tuple
  "(f32[64,128]{1,0}, f32[64]{0}, ...)"."""
  return re.findall(rf"^\s*(?:ROOT )?%\S+ = (.*?) {kind}(?:-start)?\(", hlo,
                    re.M)


GRADIENTS = 20  # Parameter leaves of tiny_config's LM: one gradient each.


def test_data_parallel_step_reduces_all_gradients_in_one_all_reduce():
  setup, hlo = _train_step_hlo(dict(data=8, fsdp=1, tensor=1))
  assert len(jax.tree.leaves(setup.abstract_state.params)) == GRADIENTS
  assert inspect.count_collectives(hlo) == {"all-reduce": 1}
  # The one all-reduce carries every gradient (and the loss's sum).
  (types,) = _result_types(hlo, "all-reduce")
  assert types.count("f32[") >= GRADIENTS, types


def test_explicit_reduce_scatter_step_has_no_gradient_all_reduce():
  # grad_reduce=reduce_scatter: one reduce-scatter + all-gather pair per
  # gradient; the only all-reduce left is the loss's mean, a scalar.
  _, hlo = _train_step_hlo(dict(data=8), **{"train.grad_reduce":
                                            "reduce_scatter"})
  counts = inspect.count_collectives(hlo)
  assert counts == {"reduce-scatter": GRADIENTS, "all-gather": GRADIENTS,
                    "all-reduce": 1}, counts
  assert _result_types(hlo, "all-reduce") == ["f32[]"]
  _, auto = _train_step(dict(data=8))
  assert "reduce-scatter" not in auto, auto


@pytest.mark.parametrize("n", [2, 8])
def test_fsdp_state_bytes_per_device(n):
  setup, _ = _train_step(dict(data=1, fsdp=n, tensor=1))
  total, per_device = inspect.state_bytes(
      (setup.abstract_state.params, setup.abstract_state.opt_state))
  assert per_device <= 1.1 * total / n, (per_device, total / n)
  rows = inspect.parameter_table(setup.abstract_state.params)
  assert sum(r["bytes"] for r in rows) == sum(
      x.size * 4 for x in jax.tree.leaves(setup.abstract_state.params))


def test_inspect_sharding_script():
  env = dict(os.environ,
             XLA_FLAGS=xla_flags())
  out = subprocess.run(
      [sys.executable, "scripts/inspect_sharding.py",
       "--config=configs/lm.py:tiny", "--config.mesh.data=2",
       "--config.mesh.fsdp=2", "--config.mesh.tensor=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh: data=2 x fsdp=2 x tensor=2" in out.stdout
  assert "transformer/blocks/0/mlp/up/kernel" in out.stdout
  assert "(fsdp, tensor)" in out.stdout
  assert "collectives in the compiled train step: all-gather" in out.stdout


def test_full_remat_holds_less_with_scanned_layers_and_ring_attention():
  """remat=full keeps only each block's inputs under nnx.scan with ring
  attention too: XLA's temporaries of the train step fall well below no
  remat's (when the forward kept jax.vjp's residuals they were 0.74x of
  them; now about 0.3x. The `long` step at sequence=8 kept 753 MiB, not
  97.)"""
  def temporaries(remat):
    config, mesh = _setup(dict(data=1, fsdp=1, tensor=1, sequence=8),
                          **{"model.max_len": 512, "model.scan_layers": True,
                             "model.remat": remat, "train.batch_size": 2})
    with jax.set_mesh(mesh), rules_lib.use(rules_lib.Rules()):
      state = state_lib.make_setup(config, mesh)
      compiled = step_lib.compile_train_step(state, tasks.get(config))
    return compiled.memory_analysis().temp_size_in_bytes

  assert temporaries("full") < 0.5 * temporaries("none")
