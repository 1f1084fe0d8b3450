"""StableHLO and SavedModel export: the artifacts run in a process that
cannot import lm (the SavedModel: nor jax) and compute what our model
computes."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, assert_reordered, init_run
from lm.checks import UsageError
from lm.interop import export, savedmodel
from lm.run import restore

# Runs in a fresh interpreter where `import lm` fails: only jax and numpy.
# For each prompt array: the prompt's logits, then one decode step of the
# greedy next token.
_RUN = """
import sys
sys.modules["lm"] = None
{loader}
import numpy as np
fns = load(sys.argv[1])
out = {{}}
for i, tokens in enumerate(np.load(sys.argv[2]).values()):
  logits, k, v = fns["prefill"](tokens)
  step = np.argmax(np.asarray(logits)[:, -1], -1).astype(np.int32)[:, None]
  decoded, k, v = fns["decode"](step, k, v, np.int32(tokens.shape[1]))
  out.update({{f"prefill{{i}}": np.asarray(logits),
              f"decode{{i}}": np.asarray(decoded), f"step{{i}}": step}})
np.savez(sys.argv[3], **out)
"""


@pytest.mark.parametrize("scan", [False, True])
def test_stablehlo_lm_runs_without_lm_and_matches_the_model(tmp_path, scan):
  # One exported k, v format whichever cache layout the model keeps
  # (per layer, or stacked under scan_layers).
  run = init_run(tmp_path, scan_layers=scan)
  folder = tmp_path / "export"
  about = export.export_stablehlo(run, folder)
  assert set(about["functions"]) == {"prefill", "decode"}
  # One artifact, two batch sizes and prompt lengths (symbolic shapes).
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 256, shape).astype(np.int32)
             for shape in ((2, 5), (3, 9))]
  np.savez(tmp_path / "tokens.npz", *prompts)
  script = tmp_path / "run_export.py"
  script.write_text(_RUN.format(loader=export.LOADER))
  result = subprocess.run(
      [sys.executable, str(script), str(folder), str(tmp_path / "tokens.npz"),
       str(tmp_path / "out.npz")], capture_output=True, text=True,
      timeout=300, env={k: v for k, v in os.environ.items()
                        if k != "XLA_FLAGS"})
  assert result.returncode == 0, result.stderr[-3000:]
  got = np.load(tmp_path / "out.npz")
  loaded = restore.load(run, "1,1,1")
  d_model = loaded.config.model.d_model
  with jax.set_mesh(loaded.setup.mesh):
    model = nnx.merge(loaded.setup.graphdef, loaded.params)
    for i, tokens in enumerate(prompts):
      # Ours: the full forward over the prompt and the chosen next token.
      full = np.concatenate([tokens, got[f"step{i}"]], axis=1)
      want = np.asarray(model(full)[0])
      # Another compile of the same float32 math: sums over d_model reorder.
      length = tokens.shape[1]
      assert_reordered(got[f"prefill{i}"], want[:, :length],
                       reduction=d_model)
      assert_reordered(got[f"decode{i}"][:, 0], want[:, length],
                       reduction=d_model)
  # A second export into the folder is refused unless asked.
  with pytest.raises(UsageError, match="already holds files.*--overwrite"):
    export.export_stablehlo(run, folder)
  export.export_stablehlo(run, folder, overwrite=True)
  assert (folder / "prefill.jaxexport").exists()


def test_the_script_refuses_an_unknown_format_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "export.py"),
       f"--workdir={tmp_path}", f"--out={tmp_path / 'x'}", "--format=onnx"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode != 0
  assert "--format='onnx' is unknown" in result.stderr
  assert "Traceback" not in result.stderr


_RUN_LOGITS = """
import sys
sys.modules["lm"] = None
{loader}
import numpy as np
np.save(sys.argv[3], np.asarray(load(sys.argv[1])["logits"](
    np.load(sys.argv[2]))))
"""


def _classifier_run(tmp_path, preset: str):
  """A run directory holding a freshly initialized classifier."""
  import importlib  # noqa: PLC0415

  from lm.parallel import make_mesh, rules as rules_lib  # noqa: PLC0415
  from lm.run import checks, loop  # noqa: PLC0415
  from lm.train import checkpoint, state  # noqa: PLC0415
  config = importlib.import_module(f"configs.{preset}").get_config()
  config.mesh = dict(data=1, stage=1, fsdp=1, expert=1, sequence=1, tensor=1)
  config, _ = checks.validate(config, num_devices=1)
  workdir = tmp_path / preset
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  with rules_lib.use(rules_lib.Rules()), jax.set_mesh(mesh):
    setup = state.make_setup(config, mesh)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(0, setup.init_fn(jax.random.key(1)), force=True)
    ckpt.close()
  loop.write_config(config, workdir)
  return workdir


@pytest.mark.parametrize("preset, inputs", [
    ("mlp_digits", lambda rng: rng.normal(size=(3, 8, 8, 1))),
    ("classify_text", lambda rng: rng.integers(1, 256, (2, 40))),
])
def test_stablehlo_classifiers_match_the_model(tmp_path, preset, inputs):
  run = _classifier_run(tmp_path, preset)
  folder = tmp_path / "export"
  export.export_stablehlo(run, folder)
  x = inputs(np.random.default_rng(0))
  x = x.astype(np.float32 if x.dtype.kind == "f" else np.int32)
  np.save(tmp_path / "x.npy", x)
  script = tmp_path / "run_logits.py"
  script.write_text(_RUN_LOGITS.format(loader=export.LOADER))
  result = subprocess.run(
      [sys.executable, str(script), str(folder), str(tmp_path / "x.npy"),
       str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=300,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert result.returncode == 0, result.stderr[-3000:]
  loaded = restore.load(run, "1,1,1")
  with jax.set_mesh(loaded.setup.mesh):
    want = np.asarray(nnx.merge(loaded.setup.graphdef, loaded.params)(x))
  assert_reordered(np.load(tmp_path / "y.npy"), want,
                   reduction=int(np.prod(x.shape[1:])))


def test_a_run_without_a_checkpoint_is_refused(tmp_path):
  import shutil  # noqa: PLC0415

  from lm.train.checkpoint import CheckpointError  # noqa: PLC0415
  run = init_run(tmp_path)
  shutil.rmtree(run / "checkpoints")
  with pytest.raises(CheckpointError, match="no checkpoint"):
    export.export_stablehlo(run, tmp_path / "export")
  assert not (tmp_path / "export").exists()


# TensorFlow alone runs the SavedModels: `import lm` and `import jax` fail.
# argv: {name: SavedModel folder} as JSON, a folder of <name>.npz inputs,
# the result file. Each input goes to serving_default; a language model's
# greedy next token then goes to its decode signature with the KV cache.
_RUN_TF = """
import json, sys
sys.modules["lm"] = None
sys.modules["jax"] = None
import numpy as np
import tensorflow as tf
out = {}
for name, folder in json.loads(sys.argv[1]).items():
  model = tf.saved_model.load(folder)
  serve = model.signatures["serving_default"]
  out[f"{name}.signatures"] = np.array(sorted(model.signatures))
  out[f"{name}.variables"] = np.int32(len(serve.variables))
  (arg,) = serve.structured_input_signature[1]
  for i, x in enumerate(np.load(f"{sys.argv[2]}/{name}.npz").values()):
    result = serve(**{arg: x})
    out[f"{name}.{i}"] = result["logits"].numpy()
    if "decode" in model.signatures:
      step = np.argmax(result["logits"][:, -1], -1).astype(np.int32)[:, None]
      out[f"{name}.{i}.step"] = step
      out[f"{name}.{i}.decode"] = model.signatures["decode"](
          token=step, k=result["k"], v=result["v"],
          index=x.shape[1])["logits"].numpy()
np.savez(sys.argv[3], **out)
"""


def _assert_float32_close(actual, desired, *, reduction: int) -> None:
  """The issue's float32 bar, rtol 1e-5, plus an atol for values near 0:
  TensorFlow's XLA compiles the same StableHLO with other fusions, so a
  sum of `reduction` terms may round in another order (assert_reordered:
  2 eps sqrt(n) max|desired|, about 2e-6 of the largest logit at n = 64)."""
  desired = np.asarray(desired)
  atol = (2 * np.finfo(np.float32).eps * np.sqrt(reduction)
          * np.max(np.abs(desired)))
  np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=atol)


def _int8_run(run, out):
  """`run` converted to an int8 serving run (post-training quantization),
  as scripts/quantize.py writes it."""
  from lm.quant import serving  # noqa: PLC0415
  from lm.run import loop  # noqa: PLC0415
  from lm.train import checkpoint  # noqa: PLC0415
  loaded = restore.load(run, "1,1,1")
  config = serving.serving_config(loaded.config)
  with jax.set_mesh(loaded.setup.mesh):
    params = serving.convert(loaded.params, config)
    ckpt = checkpoint.Checkpointer(out / "checkpoints", async_save=False)
    ckpt.save(0, serving.checkpoint_item(params), force=True)
    ckpt.close()
  loop.write_config(config, out)
  return out


def _jitted(loaded):
  """Our model as a function of its input, jitted: one compile per shape
  costs less than eager dispatch op by op."""
  graphdef, params = loaded.setup.graphdef, loaded.params
  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  return lambda x: forward(params, x)


def test_savedmodels_run_in_tensorflow_alone_and_match_the_model(tmp_path):
  lm_run = init_run(tmp_path)
  runs = {"lm": lm_run, "int8": _int8_run(lm_run, tmp_path / "int8"),
          "mlp": _classifier_run(tmp_path, "mlp_digits")}
  rng = np.random.default_rng(0)
  # Two batch sizes and prompt lengths: one SavedModel, symbolic shapes.
  prompts = [rng.integers(1, 256, shape).astype(np.int32)
             for shape in ((2, 5), (3, 9))]
  inputs = {"lm": prompts, "int8": prompts[:1],
            "mlp": [rng.normal(size=(3, 8, 8, 1)).astype(np.float32)]}
  for name, run in runs.items():
    about = savedmodel.export_savedmodel(run, tmp_path / f"{name}_sm")
    assert about["format"] == "savedmodel"
    np.savez(tmp_path / f"{name}.npz", *inputs[name])
  script = tmp_path / "run_tf.py"
  script.write_text(_RUN_TF)
  folders = {name: str(tmp_path / f"{name}_sm") for name in runs}
  result = subprocess.run(
      [sys.executable, str(script), json.dumps(folders), str(tmp_path),
       str(tmp_path / "out.npz")], capture_output=True, text=True,
      timeout=300, env={k: v for k, v in os.environ.items()
                        if k != "XLA_FLAGS"})
  assert result.returncode == 0, result.stderr[-3000:]
  got = np.load(tmp_path / "out.npz")
  assert list(got["lm.signatures"]) == ["decode", "prefill",
                                        "serving_default"]
  assert list(got["mlp.signatures"]) == ["logits", "serving_default"]
  for name, run in runs.items():
    loaded = restore.load(run, "1,1,1")
    # The weights are variables, not constants folded into the graph: one
    # per parameter (int8 ones too); the largest one's bytes are stored in
    # variables/ and nowhere in the graph.
    weights = jax.tree.leaves(loaded.params)
    assert got[f"{name}.variables"] == len(weights)
    largest = np.asarray(max(weights, key=lambda w: w.nbytes)).tobytes()
    folder = tmp_path / f"{name}_sm"
    assert largest[:256] not in (folder / "saved_model.pb").read_bytes()
    assert largest[:256] in (
        folder / "variables" / "variables.data-00000-of-00001").read_bytes()
    forward = _jitted(loaded)
    with jax.set_mesh(loaded.setup.mesh):
      if name == "mlp":
        (x,) = inputs[name]
        _assert_float32_close(got["mlp.0"], forward(x), reduction=x[0].size)
        continue
      d_model = loaded.config.model.d_model
      for i, tokens in enumerate(inputs[name]):
        # The full forward over the prompt and the chosen next token.
        full = np.concatenate([tokens, got[f"{name}.{i}.step"]], axis=1)
        want = np.asarray(forward(full)[0])
        length = tokens.shape[1]
        # int8 too: the same integer matmuls, while no activation lies
        # within float rounding of an int8 rounding boundary (none does
        # here; the inputs are fixed).
        _assert_float32_close(got[f"{name}.{i}"], want[:, :length],
                              reduction=d_model)
        _assert_float32_close(got[f"{name}.{i}.decode"][:, 0],
                              want[:, length], reduction=d_model)


def test_savedmodel_without_tensorflow_names_the_pip_command(
    tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # Not installed.
  with pytest.raises(UsageError, match=r"--format=savedmodel needs "
                     r"TensorFlow.*: pip install tensorflow-cpu==") as e:
    savedmodel.export_savedmodel(tmp_path, tmp_path / "export")
  # The pin it names is the one the test dependencies install.
  pin = str(e.value).rsplit("pip install ", 1)[1]
  with open(os.path.join(REPO, "requirements-test.txt")) as f:
    assert pin in f.read().split()
