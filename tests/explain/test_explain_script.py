"""scripts/explain.py: a request it cannot serve fails with one line naming
the flag or file and the fix, before anything is restored or compiled; and
one run of the script on an MLP run directory writes the pixel
attributions with their completeness gap. (The LM's run of the script is
docs/interpretability.md's command, run by tests/e2e/test_docs_commands.py.)"""
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import REPO, _gan_mlp, _mlp, tiny_config, xla_flags
from lm import config as config_lib
from lm.checks import UsageError
from lm.explain import report
from lm.parallel import make_mesh
from lm.run import loop
from lm.train import checkpoint, state as state_lib


def _run_dir(path, config, checkpoint_too=False):
  """A run directory holding `config` (resolved, on one device), with a
  freshly initialized checkpoint if asked."""
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  config = config_lib.resolve(config)
  path.mkdir()
  if checkpoint_too:
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh):
      setup = state_lib.make_setup(config, mesh)
      ckpt = checkpoint.Checkpointer(path / "checkpoints", async_save=False)
      ckpt.save(0, setup.init_fn(jax.random.key(0)), force=True)
      ckpt.close()
  loop.write_config(config, path)
  return str(path)


@pytest.mark.parametrize("family, request_, message", [
    ("gan", report.Request(),
     "holds a gan run (config.model.name='gan'); explain.py supports "
     "language models"),
    ("mlp", report.Request(methods=("attention",)),
     "--methods=attention: the mlp family has no attention layers to map; "
     "use --methods=ig"),
    ("lm", report.Request(text="x" * 33),
     "--text is 33 tokens, longer than the model's context "
     "(config.model.max_len=32); shorten it."),
    ("lm", report.Request(text="ROMEO."), "has no checkpoint in"),
])
def test_a_request_it_cannot_serve_names_the_flag_and_the_fix(
    tmp_path, family, request_, message):
  config = {"gan": _gan_mlp, "mlp": _mlp, "lm": tiny_config}[family]()
  workdir = _run_dir(tmp_path / "run", config)
  with pytest.raises(UsageError) as error:
    report.check(workdir, request_)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_explain_writes_an_mlps_pixel_attributions(tmp_path, data_dir):
  workdir = _run_dir(tmp_path / "mlp", _mlp(), checkpoint_too=True)
  env = dict(os.environ, LM_DATA_DIR=data_dir, XLA_FLAGS=xla_flags())
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "explain.py"),
       f"--workdir={workdir}", "--num_images=3"], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert "completeness gap (convergence delta)" in result.stdout
  out = tmp_path / "mlp" / "explain"
  assert sorted(p.name for p in out.iterdir()) == ["attributions.json",
                                                   "attributions.png"]
  written = json.loads((out / "attributions.json").read_text())
  assert written["steps"] == 50 and written["rule"] == "gauss_legendre"
  assert len(written["images"]) == 3
  for image in written["images"]:
    assert image["target_class"] == image["predicted"]
    assert image["relative_gap"] < 0.01, image
    assert len(image["attributions"]) == 8  # H x W x C = 8 x 8 x 1.
