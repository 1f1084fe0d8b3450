"""scripts/explain.py: a request it cannot serve fails with one line naming
the flag or file and the fix, before anything is restored or compiled; and
runs of the script write, on an MLP run directory, the pixel attributions
with their completeness gap; on a text classifier's, the attention maps and
the token attributions; on a mixture-of-experts LM trained with expert
parallelism, the same, on a mesh without the expert axis. (The dense LM's
run of the script is docs/interpretability.md's command, run by
tests/e2e/test_docs_commands.py.)"""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, _gan_mlp, _mlp, _text, tiny_config, xla_flags
from explain_models import random_params
from lm import config as config_lib
from lm.checks import UsageError
from lm.explain import report
from lm.parallel import make_mesh
from lm.run import loop
from lm.train import checkpoint, state as state_lib


def _moe():
  """The moe preset (8 experts over expert=4), tiny: one layer, on 4
  devices."""
  from configs import lm  # noqa: PLC0415
  c = lm.get_config("moe")
  c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                 max_len=32)
  c.mesh.update(data=1, expert=4)
  return c


def _run_dir(path, config, checkpoint_too=False):
  """A run directory holding `config` (resolved; on one device unless its
  mesh has an expert axis), with a checkpoint of random parameters if
  asked (drawn on the host: an init compile costs seconds)."""
  if config.mesh.get("expert", 1) == 1:
    config.mesh = dict(data=1, fsdp=1, tensor=1)
  config = config_lib.resolve(config)
  path.mkdir()
  if checkpoint_too:
    mesh = make_mesh(config.mesh, jax.devices()[:math.prod(
        config.mesh.values())])
    with jax.set_mesh(mesh):
      setup = state_lib.make_setup(config, mesh)
      abstract = setup.abstract_state
      state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
      state = state.replace(params=random_params(abstract.params))
      state = jax.device_put(state, setup.state_shardings)
      ckpt = checkpoint.Checkpointer(path / "checkpoints", async_save=False)
      ckpt.save(0, state, force=True)
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
    ("moe", report.Request(text="ROMEO.", mesh="data=2,expert=4"),
     "--mesh=data=2,expert=4: explain.py runs the layers one at a time on "
     "one text, without context, pipeline or expert parallelism; drop the "
     "sequence, stage and expert axes."),
])
def test_a_request_it_cannot_serve_names_the_flag_and_the_fix(
    tmp_path, family, request_, message):
  config = {"gan": _gan_mlp, "mlp": _mlp, "lm": tiny_config,
            "moe": _moe}[family]()
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


def _explain(workdir, *flags, devices=8):
  """scripts/explain.py on `workdir`; its printed lines."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "explain.py"),
       f"--workdir={workdir}", *flags], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  return result.stdout


def _check_text_outputs(out, n_layers, n_heads, text, causal):
  """The files of a text family: one PNG per layer, the maps (rows sum to
  1; causal or both ways), the attributions as PNG, HTML (a span per token)
  and JSON."""
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [f"attention_layer_{i}.png" for i in range(n_layers)]
      + ["attention.npz", "attributions.html", "attributions.json",
         "attributions.png"])
  for name in [f"attention_layer_{i}.png" for i in range(n_layers)] + [
      "attributions.png"]:
    assert (out / name).read_bytes()[:4] == b"\x89PNG", name
  L = len(text.encode())
  with np.load(out / "attention.npz") as maps:
    assert sorted(maps.files) == sorted(
        ["tokens"] + [f"layer_{i}" for i in range(n_layers)])
    np.testing.assert_array_equal(maps["tokens"], list(text.encode()))
    for i in range(n_layers):
      probs_HxLxL = maps[f"layer_{i}"]
      assert probs_HxLxL.shape == (n_heads, L, L)
      np.testing.assert_allclose(probs_HxLxL.sum(-1), 1.0, atol=1e-5)
      above = probs_HxLxL[:, np.triu_indices(L, 1)[0],
                          np.triu_indices(L, 1)[1]]
      assert (not above.any()) if causal else above.min() > 0
  assert (out / "attributions.html").read_text().count("<span ") == L
  written = json.loads((out / "attributions.json").read_text())
  assert len(written["attributions"]) == L
  return written


def test_explain_writes_a_text_classifiers_maps_and_attributions(tmp_path):
  config = _text()  # 2 layers of 4 heads.
  workdir = _run_dir(tmp_path / "text", config, checkpoint_too=True)
  text = "ROMEO. But soft"  # 15 bytes; the model's context is 16.
  printed = _explain(workdir, f"--text={text}", devices=1)
  assert "attention maps: 2 layers x 4 heads over 15 tokens" in printed
  written = _check_text_outputs(tmp_path / "text" / "explain", n_layers=2,
                                n_heads=4, text=text, causal=False)
  predicted = written["target"]["class"]  # --target_class=-1: predicted.
  assert f"(predicted: {written['target']['name']}," in printed
  assert 0 <= predicted < config.model.num_classes
  assert written["relative_gap"] < 0.01, written


def test_explain_runs_on_an_moe_lm_trained_with_expert_parallelism(
    tmp_path):
  """A run of the moe preset on expert=4, explained on as many devices:
  explain.py routes the one text's tokens as one group on an FSDP mesh
  (expert parallelism would split the text's batch of 1 over 4 expert
  shards)."""
  workdir = _run_dir(tmp_path / "moe", _moe(), checkpoint_too=True)
  text = "ROMEO. But soft"
  printed = _explain(workdir, f"--text={text}", devices=4)
  assert "'fsdp': 4, 'expert': 1" in printed
  written = _check_text_outputs(tmp_path / "moe" / "explain", n_layers=1,
                                n_heads=4, text=text, causal=True)
  assert written["target"]["position"] == len(text) - 1
  assert math.isfinite(written["score"]) and math.isfinite(written["gap"])
