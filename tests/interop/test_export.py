"""StableHLO export: the artifacts run in a process that cannot import lm
and compute what our model computes."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, assert_reordered, init_run
from lm.checks import UsageError
from lm.interop import export
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


def test_stablehlo_lm_runs_without_lm_and_matches_the_model(tmp_path):
  run = init_run(tmp_path)
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
