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
_RUN = """
import sys
sys.modules["lm"] = None
{loader}
import numpy as np
fns = load(sys.argv[1])
tokens = np.load(sys.argv[2])
logits, k, v = fns["prefill"](tokens)
step = np.argmax(np.asarray(logits)[:, -1], -1).astype(np.int32)[:, None]
decoded, k, v = fns["decode"](step, k, v, np.int32(tokens.shape[1]))
np.savez(sys.argv[3], prefill=np.asarray(logits), decode=np.asarray(decoded),
         step=step)
"""


def _run_loader(folder, tokens, tmp_path) -> dict:
  np.save(tmp_path / "tokens.npy", tokens)
  script = tmp_path / "run_export.py"
  script.write_text(_RUN.format(loader=export.LOADER))
  out = tmp_path / "out.npz"
  result = subprocess.run(
      [sys.executable, str(script), str(folder), str(tmp_path / "tokens.npy"),
       str(out)], capture_output=True, text=True, timeout=300,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(np.load(out))


@pytest.mark.parametrize("batch, length", [(2, 5), (3, 9)])
def test_stablehlo_lm_runs_without_lm_and_matches_the_model(
    tmp_path, batch, length):
  run = init_run(tmp_path)
  folder = tmp_path / "export"
  about = export.export_stablehlo(run, folder)
  assert set(about["functions"]) == {"prefill", "decode"}
  tokens = np.random.default_rng(batch).integers(
      1, 256, (batch, length)).astype(np.int32)
  got = _run_loader(folder, tokens, tmp_path)
  # Ours: the full forward over the prompt and the chosen next token.
  loaded = restore.load(run, "1,1,1")
  with jax.set_mesh(loaded.setup.mesh):
    model = nnx.merge(loaded.setup.graphdef, loaded.params)
    full = np.concatenate([tokens, got["step"]], axis=1)
    want = np.asarray(model(full)[0])
  # Another compile of the same float32 math: sums over d_model reorder.
  d_model = loaded.config.model.d_model
  assert_reordered(got["prefill"], want[:, :length], reduction=d_model)
  assert_reordered(got["decode"][:, 0], want[:, length], reduction=d_model)


def test_an_export_is_not_overwritten_unless_asked(tmp_path):
  run = init_run(tmp_path)
  folder = tmp_path / "export"
  folder.mkdir()
  (folder / "keep.txt").write_text("mine")
  with pytest.raises(UsageError, match="already holds files.*--overwrite"):
    export.export_stablehlo(run, folder)
  assert (folder / "keep.txt").read_text() == "mine"
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
