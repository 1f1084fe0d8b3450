"""Precision policies: every family steps with finite losses under each
policy; float16's dynamic loss scale skips overflowing steps, halves, grows,
and survives a checkpoint."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAMILIES, tiny_config, train_family as train
from lm.parallel import Rules, make_mesh, rules as rules_lib
from lm.tasks.language import lm_loss
from lm.run import loop
from lm.train import checkpoint as ckpt_lib
from lm.train import state as state_lib, step as step_lib

MESH = dict(data=2, fsdp=2, tensor=2)


# float32 is every other test's policy; bfloat16 needs no family-specific
# machinery, float16 adds loss scaling to each family's step.
CASES = [("lm", "bfloat16")] + [(f, "float16") for f in ["lm", *FAMILIES]]


@pytest.mark.parametrize("family,policy", CASES)
def test_every_family_steps_under_every_policy(family, policy):
  if family == "lm":
    config = tiny_config(**{"precision.compute_dtype": policy})
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 256, (16, 33)).astype(np.int32)}
               for _ in range(2)]
  else:
    config = FAMILIES[family]()
    config.precision.compute_dtype = policy
    batches = None
  history, state, _ = train(config, MESH, steps=2, batches=batches)
  for m in history:
    assert np.isfinite(m["loss"]), (family, policy, m)
  if policy == "float16":
    assert history[-1]["loss_scale"] == 2.0 ** 15
    assert history[-1]["skipped_steps"] == 0
    assert state.loss_scale is not None
  else:
    assert "loss_scale" not in history[-1] and state.loss_scale is None


def _fp16_setup(growth_interval=2000):
  config = tiny_config(**{"precision.compute_dtype": "float16"})
  config.precision.loss_scale.update(initial=2.0 ** 10,
                                     growth_interval=growth_interval)
  mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  return config, mesh


def _boosted_loss(model, batch, key):
  """The LM loss times batch["boost"]: a huge boost overflows float32 once
  multiplied by the loss scale, as a float16 overflow would."""
  del key
  return lm_loss(model, batch)[0] * batch["boost"], {}


def _jit_step(setup):
  return jax.jit(lambda s, b: step_lib.supervised_train_step(
      s, b, setup=setup, loss_fn=_boosted_loss))


def _batch(boost):
  rng = np.random.default_rng(0)
  return {"tokens": jnp.asarray(rng.integers(0, 256, (16, 33)), jnp.int32),
          "boost": jnp.float32(boost)}


def test_overflow_skips_the_step_and_halves_the_scale():
  config, mesh = _fp16_setup()
  with jax.set_mesh(mesh), rules_lib.use(Rules()):
    setup = state_lib.make_setup(config, mesh)
    step = _jit_step(setup)
    state = setup.init_fn(jax.random.key(0))
    state, _ = step(state, _batch(1.0))  # One real step: Adam state nonzero.
    before = jax.device_get(state)
    state, m = step(state, _batch(1e36))
    after = jax.device_get(state)
  assert not np.isfinite(m["grad_norm"])
  assert float(m["loss_scale"]) == 2.0 ** 9 and int(m["skipped_steps"]) == 1
  assert int(after.step) == int(before.step) + 1
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state,
               before.opt_state)


def test_scale_grows_after_enough_finite_steps():
  config, mesh = _fp16_setup(growth_interval=2)
  with jax.set_mesh(mesh), rules_lib.use(Rules()):
    setup = state_lib.make_setup(config, mesh)
    step = _jit_step(setup)
    state = setup.init_fn(jax.random.key(0))
    scales = []
    for _ in range(4):
      before = jax.device_get(state.params)
      state, m = step(state, _batch(1.0))
      scales.append(float(m["loss_scale"]))
  assert scales == [2.0 ** 10, 2.0 ** 11, 2.0 ** 11, 2.0 ** 12]
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                         jax.device_get(state.params))
  assert all(jax.tree.leaves(changed))


def test_loss_scale_survives_a_checkpoint(tmp_path):
  config, mesh = _fp16_setup()
  with jax.set_mesh(mesh), rules_lib.use(Rules()):
    setup = state_lib.make_setup(config, mesh)
    step = _jit_step(setup)
    state = setup.init_fn(jax.random.key(0))
    state, _ = step(state, _batch(1e36))
    state, _ = step(state, _batch(1.0))
    ckpt = ckpt_lib.Checkpointer(tmp_path, async_save=False)
    ckpt.save(2, state)
    restored = ckpt.restore(setup.abstract_state)
    ckpt.close()
  for name in ("scale", "good_steps", "skipped_steps"):
    assert (float(getattr(restored.loss_scale, name))
            == float(getattr(state.loss_scale, name))), name
  assert float(restored.loss_scale.scale) == 2.0 ** 9
  assert int(restored.loss_scale.skipped_steps) == 1
  assert int(restored.loss_scale.good_steps) == 1


def test_float16_run_logs_scale_and_skips(tmp_path, data_dir):
  config = tiny_config(data_dir, mesh=MESH,
                       **{"precision.compute_dtype": "float16"})
  loop.train(config, tmp_path)
  lines = [json.loads(s) for s in
           (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_lines = [x for x in lines if x["split"] == "train"]
  assert train_lines and all("loss_scale" in x and "skipped_steps" in x
                             for x in train_lines)


def test_cpu_bf16_dots_follow_the_cpu_unless_forced(monkeypatch):
  """auto: bfloat16 GEMMs where the CPU has AVX512-BF16 or AMX, float32
  GEMMs elsewhere; a forced path is kept; other dtypes never widen."""
  from lm import cpu, models  # noqa: PLC0415
  cases = {frozenset({"avx2", "avx512f"}): "float32",
           frozenset({"avx512f", "avx512_bf16"}): "",
           frozenset({"avx512f", "amx_bf16"}): ""}
  for flags, want in cases.items():
    monkeypatch.setattr(cpu, "flags", lambda flags=flags: flags)
    config = tiny_config(**{"precision.compute_dtype": "bfloat16"})
    assert models.model_config(config).dot_dtype == want, flags
    for forced, forced_want in (("native", ""), ("float32", "float32")):
      config.precision.cpu_bf16_dots = forced
      assert models.model_config(config).dot_dtype == forced_want
    config = tiny_config(**{"precision.cpu_bf16_dots": "float32"})
    assert models.model_config(config).dot_dtype == ""  # float32 model.
  # An ahead-of-time compile for a TPU (lm/run/aot.py) on this CPU: the
  # target's matmuls, never the host's path.
  from lm import backend  # noqa: PLC0415
  config = tiny_config(**{"precision.compute_dtype": "bfloat16",
                          "precision.cpu_bf16_dots": "float32"})
  with backend.target("tpu"):
    assert models.model_config(config).dot_dtype == ""


def test_a_bad_cpu_bf16_dots_names_the_key():
  from lm import checks  # noqa: PLC0415
  from lm.train import precision  # noqa: PLC0415
  config = tiny_config(**{"precision.cpu_bf16_dots": "fast"})
  with pytest.raises(checks.ConfigError,
                     match="config.precision.cpu_bf16_dots"):
    precision.check(config.precision)


def _dot_operand_types(config):
  """The operand dtypes of every dot in the compiled-for loss and gradient
  of the tiny LM under `config`, and the loss."""
  import re  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from lm import models  # noqa: PLC0415
  model_cfg = models.model_config(config)
  model = models.MODELS["transformer"].make(model_cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 33)),
                       jnp.int32)
  loss = lambda p: lm_loss(nnx.merge(graphdef, p), {"tokens": tokens})[0]
  fn = jax.jit(jax.value_and_grad(loss))
  text = fn.lower(params).as_text()
  types = re.findall(r"stablehlo\.dot_general .*?: \(tensor<[^>]*x(\w+)>, "
                     r"tensor<[^>]*x(\w+)>\)", text)
  return types, float(fn(params)[0])


def test_float32_dots_widen_every_matmul_and_keep_the_loss():
  """The float32 path leaves no bfloat16 operand in any matmul, forward or
  backward (the native path has them), and computes the native path's loss
  within bfloat16's rounding: the same products, summed in float32; only
  attention's probabilities are no longer rounded to bfloat16."""
  native = tiny_config(**{"precision.compute_dtype": "bfloat16",
                          "precision.cpu_bf16_dots": "native"})
  widened = tiny_config(**{"precision.compute_dtype": "bfloat16",
                           "precision.cpu_bf16_dots": "float32"})
  native_types, native_loss = _dot_operand_types(native)
  widened_types, widened_loss = _dot_operand_types(widened)
  assert any("bf16" in t for t in native_types), native_types
  assert widened_types and not any("bf16" in t for t in widened_types), (
      widened_types)
  # A loss near ln(256) ~ 5.5: bfloat16 rounds relative 2^-8 per value.
  assert abs(widened_loss - native_loss) < 2 ** -8 * abs(native_loss)
