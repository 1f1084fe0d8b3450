"""Quantization-aware training (qwix) and int8 serving conversion."""
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import (FAMILIES, REPO, assert_reordered, tiny_config,
                      train_family as train, xla_flags)
from lm.parallel import Rules, make_mesh, rules as rules_lib
from lm.quant import serving
from lm.tasks.language import lm_loss
from lm.run import loop
from lm.train import state as state_lib

ATOL = 1e-5  # See tests/parallel/test_parallel.py: Adam moves ~0-gradient weights.


def _single_device_setup(config):
  mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  return mesh, state_lib.make_setup(config, mesh)


def _initialized(mode: str):
  """(mesh, setup, params) of the tiny LM in quant `mode` on one device."""
  mesh, setup = _single_device_setup(tiny_config(**{"quant.mode": mode}))
  with jax.set_mesh(mesh), rules_lib.use(Rules()):
    return mesh, setup, setup.init_fn(jax.random.key(0)).params


def _tokens(batch=4, length=33):
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.integers(0, 256, (batch, length)), jnp.int32)


def _integer_dots(hlo: str) -> int:
  """Dot products whose result is int32, i.e. with integer operands."""
  return len(re.findall(r"= s32\[[^\]]*\][^ ]* dot\(", hlo))


def _forward_hlo(setup, params, tokens) -> str:
  fn = jax.jit(lambda p, t: nnx.merge(setup.graphdef, p)(t)[0])
  return fn.lower(params, tokens).compile().as_text()


def test_int8_forward_runs_integer_dot_products():
  counts = {}
  for mode in ("none", "int8"):
    mesh, setup, params = _initialized(mode)
    with jax.set_mesh(mesh), rules_lib.use(Rules()):
      counts[mode] = _integer_dots(_forward_hlo(setup, params,
                                                _tokens(length=32)))
  # q, k, v, o, gate, up, down in each of the 2 layers; the tied head and
  # the attention scores stay float.
  assert counts == {"none": 0, "int8": 7 * 2}


def test_qat_gradients_at_step_0_are_close_to_float():
  grads = {}
  for mode in ("none", "int8"):
    mesh, setup, params = _initialized(mode)  # The same params for both.
    with jax.set_mesh(mesh), rules_lib.use(Rules()):
      grads[mode] = jax.jit(jax.grad(
          lambda p: lm_loss(nnx.merge(setup.graphdef, p), {"tokens": _tokens()})[0]))(
              params)
  flat_f = dict(jax.tree_util.tree_leaves_with_path(grads["none"]))
  for path, g in jax.tree_util.tree_leaves_with_path(grads["int8"]):
    ref = np.asarray(flat_f[path])
    g = np.asarray(g)
    assert np.linalg.norm(g) > 0, path
    # Straight-through: the quantized model's gradient is the float one's,
    # evaluated at quantized values (measured ~5% apart here).
    rel = np.linalg.norm(g - ref) / np.linalg.norm(ref)
    assert rel < 0.2, (jax.tree_util.keystr(path), rel)


def _lm_batches(steps=3):
  rng = np.random.default_rng(0)
  return [{"tokens": rng.integers(0, 256, (16, 33)).astype(np.int32)}
          for _ in range(steps)]


CASES = {
    "lm_int8": lambda: (tiny_config(**{"quant.mode": "int8"}), _lm_batches()),
    "lm_prune": lambda: (tiny_config(**{
        "prune.sparsity": 0.5, "prune.update_every": 1,
        "prune.end_step": 2}), _lm_batches()),
    "mlp_int8": lambda: (_with(FAMILIES["mlp"](), **{"quant.mode": "int8"}),
                         None),
    "mlp_prune": lambda: (_with(FAMILIES["mlp"](), **{
        "prune.sparsity": 0.8, "prune.update_every": 1,
        "prune.end_step": 2}), None),
}


def _with(config, **overrides):
  for key, value in overrides.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return config


# Quantized runs: a value that lands within an ulp of a rounding tie can
# round the other way on another mesh, and Adam turns the small gradient
# change into a visible parameter change where the gradient is near zero.
# How many flips a run gets depends on the float rounding of everything
# before the quantizers: with jax.nn's attention a few weights moved by
# ~2e-5; with the chunked attention (same math, other rounding) 4% of one
# kernel moved, by up to 9.2e-4, and the loss and gradient norm by 4e-5 and
# 1.1e-4 relative, another weight by 2.6e-3. So after 3 Adam steps (lr
# 1e-2) quantized parameters must be within half a step (5e-3) everywhere
# and within 2e-4 on average over each tensor (measured up to 4.3e-5), and
# quantized metrics within rtol 5e-4. A wrong sharding moves nearly every
# weight by about a whole step (1e-2).
QUANT_ATOL = 5e-3
QUANT_MEAN_ATOL = 2e-4
QUANT_METRICS_RTOL = 5e-4


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_and_pruned_sharded_equals_single_device(case):
  config, batches = CASES[case]()
  ref_history, ref_state, _ = train(config, dict(data=1, fsdp=1, tensor=1),
                                    batches=batches)
  config, batches = CASES[case]()
  history, state, _ = train(config, dict(data=2, fsdp=2, tensor=2),
                            batches=batches)
  rtol = QUANT_METRICS_RTOL if "int8" in case else 1e-5
  for key in ref_history[0]:
    np.testing.assert_allclose([h[key] for h in history],
                               [h[key] for h in ref_history], rtol=rtol,
                               err_msg=key)
  atol = QUANT_ATOL if "int8" in case else ATOL
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=atol),
               state.params, ref_state.params)
  if "int8" in case:
    mean_diffs = jax.tree.map(lambda a, b: float(np.mean(np.abs(a - b))),
                              state.params, ref_state.params)
    assert max(jax.tree.leaves(mean_diffs)) < QUANT_MEAN_ATOL, mean_diffs


def test_int8_conversion_gives_integer_weights_and_the_qat_outputs():
  config = tiny_config(**{"quant.mode": "int8"})
  history, state, setup = train(config, dict(data=2, fsdp=2, tensor=2),
                                batches=_lm_batches(2))
  mesh = setup.mesh
  config = serving.serving_config(config)
  with jax.set_mesh(mesh), rules_lib.use(Rules()):
    params = serving.convert(jax.device_put(state.params,
                                            setup.param_shardings), config)
    model = serving.setup_for(config, mesh)
    qat_logits = nnx.merge(setup.graphdef, state.params)(_tokens(length=32))[0]
    int8_logits = nnx.merge(model.graphdef, params)(_tokens(length=32))[0]
  kernel = params["transformer"]["blocks"][0]["mlp"]["up"]["kernel"]
  assert kernel["array"]["qvalue"].dtype == jnp.int8
  assert kernel["array"]["scale"].shape == (1, 128)  # Per output channel.
  assert params["transformer"]["embedding"].dtype == jnp.float32  # Kept.
  # Bytes, counted independently: a quantized projection keeps 1 byte per
  # weight plus a float32 scale per output channel (its size over its
  # contracted inputs); everything else stays 4 bytes per value.
  cfg = setup.model_cfg
  fan_in = {"q": cfg.d_model, "k": cfg.d_model, "v": cfg.d_model,
            "o": cfg.n_heads * cfg.k, "gate": cfg.d_model, "up": cfg.d_model,
            "down": cfg.d_ff}
  want = 0
  for path, x in jax.tree_util.tree_leaves_with_path(state.params):
    names = [p.key for p in path]
    if names[-1] == "kernel" and names[-2] in fan_in:
      want += x.size + 4 * x.size // fan_in[names[-2]]
    else:
      want += 4 * x.size
  assert serving.params_bytes(params) == want
  dtypes = serving.dtype_bytes(params)
  assert dtypes["int8"] > dtypes["float32"]
  # The int8 weights and activation scales of QAT's forward pass: only the
  # float work around the integer matmuls may round differently. Where that
  # rounding puts an activation on the other side of an int8 rounding
  # boundary, the two quantize it a step apart, and that token's logits move
  # by about a step of their range (seen under XLA's LLVM level 0, which the
  # suite compiles with: one token of 128, by 0.45% of the largest logit).
  # So: at most 2 tokens of 128 may differ by more than float rounding, and
  # none by an int8 step of the logits' range (1/127). A wrong conversion
  # (scales, rounding, a transposed kernel) moves every token.
  qat_logits, int8_logits = np.asarray(qat_logits), np.asarray(int8_logits)
  diff = np.abs(int8_logits - qat_logits)
  flipped = (diff > 1e-4 + 1e-4 * np.abs(qat_logits)).any(-1)
  assert flipped.sum() <= 2, np.argwhere(flipped)
  assert diff.max() < np.abs(qat_logits).max() / 127, diff.max()


def test_quantize_and_eval_scripts(tmp_path, data_dir):
  config = tiny_config(data_dir, mesh=dict(data=2, fsdp=2, tensor=2),
                       **{"quant.mode": "int8"})
  config.train.update(steps=4, eval_every=4)
  loop.train(config, tmp_path / "qat")
  env = {"XLA_FLAGS": xla_flags(),
         "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

  def script(*args):
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout

  converted = script("scripts/quantize.py", f"--workdir={tmp_path}/qat",
                     f"--out={tmp_path}/int8")
  assert "x smaller" in converted and "'int8'" in converted
  qat = script("scripts/eval.py", f"--workdir={tmp_path}/qat",
               "--split=validation", "--batches=2")
  int8 = script("scripts/eval.py", f"--workdir={tmp_path}/int8",
                "--split=validation", "--batches=2")
  assert "int8 serving model" in int8
  loss = lambda text: float(re.search(r"loss ([0-9.]+)", text).group(1))  # noqa: E731
  assert loss(int8) == pytest.approx(loss(qat), rel=1e-3)
  # A second conversion into the same directory refuses, writing nothing.
  again = subprocess.run([sys.executable, "scripts/quantize.py",
                          f"--workdir={tmp_path}/qat",
                          f"--out={tmp_path}/int8"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and "already holds a model" in again.stderr
  # The int8 model exports as StableHLO (lm/interop/export.py) whose
  # programs, run by the plain-jax loader, compute what it computes here.
  from lm.interop import export  # noqa: PLC0415
  from lm.run import restore  # noqa: PLC0415
  export.export_stablehlo(tmp_path / "int8", tmp_path / "int8_hlo")
  namespace = {}
  exec(export.LOADER, namespace)  # noqa: S102 (our own loader's text)
  tokens = np.arange(1, 9, dtype=np.int32)[None]
  got = namespace["load"](str(tmp_path / "int8_hlo"))["prefill"](tokens)[0]
  loaded = restore.load(tmp_path / "int8", "1,1,1")
  with jax.set_mesh(loaded.setup.mesh):
    want = nnx.merge(loaded.setup.graphdef, loaded.params)(tokens)[0]
  assert_reordered(np.asarray(got), np.asarray(want),
                   reduction=config.model.d_model)
