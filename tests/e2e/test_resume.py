"""Checkpoints: exact resume in a fresh process, resharding restores, and
interruption never leaves a checkpoint that blocks resume."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np

from conftest import REPO, train_script as _train, xla_flags
from lm.run import restore


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _params(workdir, mesh_shape):
  """The latest parameters of a run, restored onto `mesh_shape`."""
  mesh_arg = ",".join(str(mesh_shape[a]) for a in ("data", "fsdp", "tensor"))
  return restore.load(workdir, mesh_arg).params


def test_resume_in_a_fresh_process_is_exact(tmp_path, data_dir,
                                            reference_run):
  # The uninterrupted run: TRAIN_ARGS, as every test that compares with it.
  whole, split = reference_run, str(tmp_path / "split")
  first = _train(split, data_dir, "--stop_at_step=5")
  assert "stopped at step 5" in first.stdout
  second = _train(split, data_dir)
  assert "resumed from step 5" in second.stdout

  def by_step(rows, split_name):
    return {r["step"]: r["loss"] for r in rows if r["split"] == split_name}
  a, b = _metrics(whole), _metrics(split)
  assert sorted(by_step(a, "train")) == list(range(1, 11))
  assert by_step(a, "train") == by_step(b, "train")  # Same data, same math.
  assert by_step(a, "eval") == by_step(b, "eval")
  mesh = dict(data=2, fsdp=2, tensor=2)
  pa = jax.device_get(_params(whole, mesh))
  pb = jax.device_get(_params(split, mesh))
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  # The run directory contract.
  row = a[0]
  assert {"step", "split", "loss", "learning_rate", "tokens_per_sec",
          "grad_norm"} <= set(row)
  evals = [r for r in a if r["split"] == "eval"]
  assert {"loss", "perplexity", "bits_per_byte"} <= set(evals[0])
  assert json.load(open(os.path.join(whole, "config.json")))["seed"] == 0
  from tensorboard.backend.event_processing import event_accumulator  # noqa
  acc = event_accumulator.EventAccumulator(os.path.join(whole, "tensorboard"))
  acc.Reload()
  assert len(acc.Scalars("train/loss")) == 10
  # scripts/eval.py on the same split reproduces the loop's last eval.
  env = dict(os.environ, LM_DATA_DIR=data_dir,
             XLA_FLAGS=xla_flags())
  out = subprocess.run([sys.executable, os.path.join(REPO, "scripts",
                                                     "eval.py"),
                        f"--workdir={whole}", "--split=validation"],
                       cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"loss {evals[-1]['loss']:.4f}" in out.stdout


def test_checkpoint_restores_onto_another_mesh(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  _train(workdir, data_dir, "--config.mesh.data=1", "--config.mesh.fsdp=8",
         "--config.mesh.tensor=1", "--config.model.n_kv_heads=4",
         "--config.train.steps=2")
  fsdp = _params(workdir, dict(data=1, fsdp=8, tensor=1))
  other = _params(workdir, dict(data=2, fsdp=1, tensor=4))
  kernel = other["transformer"]["blocks"][0]["mlp"]["down"]["kernel"]
  assert kernel.sharding.spec[0] == "tensor"
  assert fsdp["transformer"]["blocks"][0]["mlp"]["down"][
      "kernel"].sharding.spec[1] == "fsdp"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(fsdp),
               jax.device_get(other))


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  proc = _train(workdir, data_dir, "--config.train.steps=100000",
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:  # Wait until training is under way.
    if line.startswith("step") and "train" in line:
      break
  proc.send_signal(signal.SIGTERM)
  out = proc.stdout.read()
  assert proc.wait(timeout=300) == 0, out[-3000:]
  assert "SIGTERM received" in out and "stopped at step" in out
  step = int(out.split("stopped at step ")[1].split(";")[0])
  entries = os.listdir(os.path.join(workdir, "checkpoints"))
  assert str(step) in entries
  assert not [e for e in entries if "tmp" in e]
  # Resuming continues from exactly that step.
  result = _train(workdir, data_dir, f"--config.train.steps={step + 1}")
  assert f"resumed from step {step}" in result.stdout
  assert [r["step"] for r in _metrics(workdir) if r["split"] == "train"][-1] \
      == step + 1


def test_non_finite_loss_stops_with_the_step_named(tmp_path, data_dir):
  result = _train(str(tmp_path / "run"), data_dir,
                  "--config.optimizer.learning_rate=1e12",
                  "--config.optimizer.grad_clip_norm=0",
                  "--config.optimizer.warmup_steps=0",
                  "--config.optimizer.schedule=constant", check=False)
  assert result.returncode != 0
  assert "The training loss became" in result.stderr
  assert "at step" in result.stderr
