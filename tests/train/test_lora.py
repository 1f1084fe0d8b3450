"""LoRA / QLoRA: the adapted model starts as the base, bit for bit; only the
adapters train (optimizer state, gradients); merged == unmerged; a run
resumes exactly and shards like one device; merge_lora and export_hf read
a LoRA run as its merged plain run; bad configs fail in one line."""
import ast
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from conftest import assert_reordered, init_run, tiny_config
from lm import config as config_lib, tasks
from lm.checks import ConfigError
from lm.interop import hf_run, lora_run
from lm.parallel import make_mesh, rules as rules_lib
from lm.run import checks, loop, restore
from lm.train import lora, state as state_lib, step as step_lib

RANK = 8
MESH = dict(data=2, fsdp=2, tensor=2)
ONE = dict(data=1, fsdp=1, tensor=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A plain run (random init, non-zero biases) to fine-tune."""
  return init_run(tmp_path_factory.mktemp("base"))


def _config(base, data_dir="", mesh=MESH, **overrides):
  c = tiny_config(data_dir, **{"lora.rank": RANK,
                               "train.init_from": str(base), **overrides})
  c.mesh = dict(mesh)
  return c


def _setups(config):
  """(LoRA setup, the base's plain setup, mesh) of a config on a prefix of
  the devices."""
  config = config_lib.resolve(config)
  mesh = make_mesh(config.mesh,
                   jax.devices()[:math.prod(config.mesh.values())])
  return (state_lib.make_setup(config, mesh),
          state_lib.make_setup(lora.plain_config(config), mesh), mesh, config)


def _tokens(rows=4, length=16, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (rows, length)), jnp.int32)


def _bytes(tree) -> int:
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_adapted_model_starts_as_the_base_and_merges_exactly(base, quant):
  setup, plain, mesh, config = _setups(_config(base, mesh=ONE, **{
      "lora.base_quant": quant}))
  tokens = _tokens()
  with rules_lib.use(rules_lib.Rules()), jax.set_mesh(mesh):
    _, frozen = restore.load_lora_base(config, setup)
    _, _, base_params = restore.params_on(base, mesh, config.mesh)
    adapters = setup.init_fn(jax.random.key(0)).params

    @jax.jit
    def adapted(adapters, frozen):
      return lora.merge_model(setup.graphdef, adapters, frozen)(tokens)[0]

    @jax.jit
    def plain_logits(params):
      return nnx.merge(plain.graphdef, params)(tokens)[0]

    at_init = adapted(adapters, frozen)
    if quant == "none":  # B = 0: x W + (x A) 0 is x W exactly.
      np.testing.assert_array_equal(at_init, plain_logits(base_params))
    # Random B: merged W + s A B against the unmerged x W + s (x A) B.
    keys = iter(jax.random.split(jax.random.key(1), 100))
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.05 * jax.random.normal(next(keys), x.shape)
                      if "lora_b" in jax.tree_util.keystr(p) else x),
        adapters)
    unmerged = adapted(adapters, frozen)
    merged = plain_logits(jax.jit(
        lambda a, f: lora.merge(setup.graphdef, a, f, config.lora))(
            adapters, frozen))
  assert float(jnp.max(jnp.abs(unmerged - at_init))) > 1e-2  # B matters.
  # The same float32 math in another order (the update added to W before
  # the matmul, not after): the longest sums are the MLP's hidden width
  # (d_ff=128) times the layers' residual stream.
  assert_reordered(merged, unmerged, reduction=128 * 2, k=4.0)


def _steps(setup, config, mesh, batches):
  """Train steps on `mesh` from fresh adapters: (adapters, losses, the
  base before, the base after, the gradient tree of the first batch)."""
  task = tasks.get(config)
  with rules_lib.use(rules_lib.Rules()), jax.set_mesh(mesh):
    _, frozen = restore.load_lora_base(config, setup)
    before = jax.device_get(frozen)
    state = setup.init_fn(jax.random.key(0))
    _, g = jax.jit(lambda p, f: step_lib.grads(
        task.loss, p, setup.graphdef, batches[0], jax.random.key(0),
        frozen=f))(state.params, frozen)
    train = step_lib.jit_train_step(setup, task, frozen=frozen)
    losses = []
    for batch in batches:
      batch = {k: jax.device_put(v, setup.batch_sharding(v.ndim))
               for k, v in batch.items()}
      state, metrics = train(state, batch)
      losses.append(float(metrics["loss"]))
    return (jax.device_get(state.params), losses, before,
            jax.device_get(frozen), g)


def test_only_the_adapters_train_and_shard_like_one_device(base):
  setup, plain, mesh, config = _setups(_config(base))
  adapters = setup.abstract_state.params
  # Rank 8 on q, k, v, o, gate, up, down of 2 layers (d_model 64, 4 heads
  # of 16, d_ff 128): A and B per projection.
  per_layer = (3 * (64 * 8 + 8 * 64) + (64 * 8 + 8 * 64)  # q k v, o
               + 2 * (64 * 8 + 8 * 128) + (128 * 8 + 8 * 64))  # gate up, down
  assert state_lib.count_params(adapters) == 2 * per_layer
  assert lora.adapted_layers(adapters) == 14
  # adamw keeps two moments per adapter and a few scalars (step counts):
  # the optimizer state is adapter-sized, not model-sized.
  scalars = 64
  opt = _bytes(setup.abstract_state.opt_state)
  assert 2 * _bytes(adapters) <= opt <= 2 * _bytes(adapters) + scalars
  assert opt < _bytes(plain.abstract_state.opt_state) / 5
  # Adapters are sharded by the rules table: A by the kernel's input axes,
  # B by its output axes; the base as in a plain run.
  q = setup.param_shardings["transformer"]["blocks"][0]["attn"]["q"]
  assert q["kernel_lora_a"].spec == P("fsdp", None)
  assert q["kernel_lora_b"].spec == P(None, "tensor", None)  # r x H x K.
  frozen_q = setup.frozen_shardings["transformer"]["blocks"][0]["attn"]["q"]
  assert frozen_q["kernel"].spec == plain.param_shardings[
      "transformer"]["blocks"][0]["attn"]["q"]["kernel"].spec

  batches = [{"tokens": _tokens(16, 33, seed)} for seed in range(3)]
  sharded, losses, before, after, g = _steps(setup, config, mesh, batches)
  # The gradient tree is the adapters' tree: nothing w.r.t. the base.
  assert jax.tree.structure(g) == jax.tree.structure(adapters)
  # The base, an argument of every step, is neither donated nor changed.
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert np.abs(sharded["transformer"]["blocks"][0]["mlp"]["up"][
      "kernel_lora_b"]).max() > 1e-3  # B trained away from zero.
  one_setup, _, one_mesh, one_config = _setups(_config(base, mesh=ONE))
  one, one_losses, *_ = _steps(one_setup, one_config, one_mesh, batches)
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  # rtol 1e-5 plus a floor of 1e-2 of one step (lr 1e-2). Adam divides by
  # sqrt(v), so an adapter whose gradient is near zero (a cancelling sum
  # over the 16 x 32 tokens, reordered by the sharding) moves by up to
  # +-lr whatever its size; A's first gradient is proportional to B, which
  # is itself one step (~lr) old, so A has many such entries: measured
  # 2.4e-3 of a step at worst (plain runs: 1e-4, tests/parallel).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-4),
               sharded, one)


@pytest.mark.parametrize("quant,dtype", [("int8", jnp.int8),
                                         ("int4", jnp.int4)])
def test_qlora_stores_the_base_quantized_and_trains(base, quant, dtype):
  setup, plain, mesh, config = _setups(_config(base, mesh=ONE, **{
      "lora.base_quant": quant}))
  with rules_lib.use(rules_lib.Rules()), jax.set_mesh(mesh):
    _, frozen = restore.load_lora_base(config, setup)
    q = frozen["transformer"]["blocks"][0]["attn"]["q"]["kernel"]["array"]
    assert q["qvalue"].dtype == dtype and q["qvalue"].shape == (64, 4, 16)
    assert q["scale"].shape == (1, 4, 16)  # Per output channel.
    # The embedding and norms stay float; the kernels take 1/4 of float32
    # (one byte a value on XLA:CPU, int4 included), scales aside.
    assert frozen["transformer"]["embedding"].dtype == jnp.float32
    kernels = plain.abstract_state.params["transformer"]["blocks"]
    assert lora.nbytes(frozen["transformer"]["blocks"]) < 0.3 * _bytes(
        kernels)
    task = tasks.get(config)
    train = step_lib.jit_train_step(setup, task, frozen=frozen)
    state = setup.init_fn(jax.random.key(0))
    batch = {"tokens": _tokens(16, 33)}
    losses = []
    for _ in range(5):
      state, metrics = train(state, batch)
      losses.append(float(metrics["loss"]))
  assert all(math.isfinite(x) for x in losses)
  assert losses[-1] < losses[0] - 0.1


def _train(config, workdir, **kwargs):
  with rules_lib.use(rules_lib.Rules()):
    result = loop.train(config, workdir, **kwargs)
  return jax.device_get(result["params"]), result


def _train_params(config, workdir, **kwargs):
  return _train(config, workdir, **kwargs)[0]


def test_lora_run_resumes_exactly_and_reads_merged(
    base, tmp_path, data_dir):
  # Dropout on the adapters' inputs too (drawn from the step's key), and
  # an eval (the frozen base is an argument of the eval step as well).
  steps = {"train.steps": 4, "lora.dropout": 0.1, "train.eval_every": 4}
  whole, result = _train(_config(base, data_dir, **steps), tmp_path / "whole")
  split = tmp_path / "split"
  _train_params(_config(base, data_dir, **steps), split, stop_at_step=2)
  resumed, resumed_result = _train(_config(base, data_dir, **steps), split)
  jax.tree.map(np.testing.assert_array_equal, resumed, whole)
  assert resumed_result["eval"] == result["eval"]

  recorded = json.loads((split / restore.LORA_BASE).read_text())
  assert recorded == {"workdir": str(base), "step": 0}
  # The checkpoint holds adapters (and their moments), nothing of the base.
  saved = json.loads((split / "checkpoints" / "4" / "state" /
                      "_METADATA").read_text())["tree_metadata"]
  paths = [ast.literal_eval(k) for k in saved]
  leaves = [p[-1] for p in paths if p[0] == "params" or "mu" in p
            or "nu" in p]
  assert len(leaves) == 3 * 28
  assert all(k.endswith(("_lora_a", "_lora_b")) for k in leaves)

  # Every tool reads a LoRA run merged; merge_lora writes that plain run.
  loaded = restore.load(split, "1,1,1")
  assert loaded.config.lora.rank == 0 and loaded.step == 4
  # The merged parameters evaluate as the loop evaluated the adapters.
  task = tasks.get(loaded.config)
  with jax.set_mesh(loaded.setup.mesh):
    data = task.make_data()
    merged_eval = loop.evaluate(task, step_lib.jit_eval_step(
        loaded.setup, task), loaded.params, data, loaded.setup)
  assert merged_eval["loss"] == pytest.approx(result["eval"]["loss"],
                                              rel=1e-5)
  merged_dir = tmp_path / "merged"
  summary = lora_run.merge_run(str(split), str(merged_dir), mesh="1,1,1")
  assert summary["base"] == recorded
  merged = restore.load(merged_dir, "1,1,1")
  assert json.loads((merged_dir / "config.json").read_text())["lora"][
      "rank"] == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(merged.params),
               jax.device_get(loaded.params))
  with pytest.raises(Exception, match="not an empty directory"):
    lora_run.merge_run(str(split), str(merged_dir))
  # export_hf on the LoRA run writes the merged weights.
  hf_run.export_run(str(split), str(tmp_path / "hf_lora"), mesh="1,1,1")
  hf_run.export_run(str(merged_dir), str(tmp_path / "hf_merged"),
                    mesh="1,1,1")
  a = load_file(str(tmp_path / "hf_lora" / "model.safetensors"))
  b = load_file(str(tmp_path / "hf_merged" / "model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])

  # A base that moved on since the adapters were trained is refused.
  moved = base / "checkpoints" / "7"
  moved.mkdir()
  try:
    with pytest.raises(ConfigError, match="latest checkpoint is now step 7"):
      _train_params(_config(base, data_dir, **{"train.steps": 6}), split)
  finally:
    moved.rmdir()


@pytest.mark.parametrize("overrides,message", [
    ({"lora.rank": -1}, "config.lora.rank=-1 must be"),
    ({"lora.alpha": 0.0}, "config.lora.alpha=0.0 must be positive"),
    ({"lora.dropout": 1.0}, "config.lora.dropout=1.0 must be in"),
    ({"lora.base_quant": "int2"}, "config.lora.base_quant='int2' is unknown"),
    ({"train.init_from": ""}, "needs config.train.init_from"),
    ({"quant.mode": "int8"}, "with config.quant.mode"),
    ({"prune.sparsity": 0.5}, "with config.prune.sparsity"),
    ({"model.scan_layers": True}, "with config.model.scan_layers"),
])
def test_bad_lora_config_is_one_line(base, overrides, message):
  with pytest.raises(ConfigError, match=message) as e:
    checks.validate(_config(base, **overrides))
  assert "\n" not in str(e.value)


def test_pattern_matching_nothing_fails_before_anything_is_written(
    base, tmp_path):
  workdir = tmp_path / "run"
  config = _config(base, **{"lora.layers": (".*blocks/.*attn/nothing",)})
  with pytest.raises(ConfigError, match="config.lora.layers: .* matches no "
                     "layer") as e:
    _train_params(config, workdir)
  assert "transformer/blocks/0/attn/q" in str(e.value)
  assert not workdir.exists()
