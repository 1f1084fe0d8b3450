"""A killed sweep resumes: scripts/sweep.py is killed (SIGKILL) in its
second trial, after that trial's first checkpoint; the same sweep run again
(here in-process) keeps the finished trial, continues the killed one from
its checkpoint in its own run directory, and ends with both."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, xla_flags
from lm.sweep import runner

SWEEP = '''
from lm.sweep import spec

def get_config():
  s = spec.base()
  s.method = "grid"
  s.space = dict(optimizer=dict(learning_rate=dict(choices=(1e-2, 3e-3))))
  s.objective = dict(metric="accuracy", direction="maximize")
  s.pruner = dict(name="none")
  s.heartbeat_s = 1  # A killed worker's trial is stale after 2 s.
  s.stale_after_s = 2
  return s
'''
# The experiment: the MLP on digits, small, with checkpoints every 5 of 30
# steps (the kill comes after the first, well before the last).
OVERRIDES = {"model.width": 16, "model.depth": 1, "train.steps": 30,
             "train.batch_size": 32, "train.log_every": 5,
             "train.eval_every": 30, "train.checkpoint_every": 5,
             "optimizer.warmup_steps": 0}


def _config(data_dir):
  from configs import mlp_digits  # noqa: PLC0415
  c = mlp_digits.get_config()
  for key, value in {**OVERRIDES, "data.data_dir": data_dir}.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _sweep(path):
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_a_killed_sweep_resumes(data_dir, tmp_path, capsys):
  sweep_file, workdir = tmp_path / "sweep_config.py", tmp_path / "sweep"
  sweep_file.write_text(SWEEP)
  argv = [sys.executable, "scripts/sweep.py", "--config=configs/mlp_digits.py",
          f"--sweep={sweep_file}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}",
          *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
  env = dict(os.environ, XLA_FLAGS=xla_flags())
  sweep = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  checkpoints = workdir / "trial_1" / "checkpoints"
  while sweep.poll() is None and not (
      checkpoints.is_dir() and any(p.name.isdigit()
                                   for p in checkpoints.iterdir())):
    time.sleep(0.02)
  sweep.send_signal(signal.SIGKILL)
  log = sweep.communicate()[0]
  assert sweep.returncode == -signal.SIGKILL, log[-3000:]
  evals = [json.loads(line) for line in (workdir / "trial_1" / "metrics.jsonl")
           .read_text().splitlines()]
  assert max(m["step"] for m in evals) < 30, "killed after the trial ended"
  finished = (workdir / "trial_0" / "metrics.jsonl").read_bytes()

  capsys.readouterr()
  results = runner.run(_config(data_dir), _sweep(sweep_file), workdir)
  out = capsys.readouterr().out
  assert "trial 2 (trial 1 again)" in out
  assert "resumed from step" in out
  assert "trial 0:" not in out  # Finished: not run again.
  assert (workdir / "trial_0" / "metrics.jsonl").read_bytes() == finished
  rows = {r["trial"]: r for r in results["trials"]}
  assert sorted(rows) == [0, 1]
  assert [rows[0]["state"], rows[1]["state"]] == ["COMPLETE", "COMPLETE"]
  assert [rows[0]["attempts"], rows[1]["attempts"]] == [1, 2]
  assert {rows[0]["optimizer.learning_rate"],
          rows[1]["optimizer.learning_rate"]} == {1e-2, 3e-3}
  last = [json.loads(line) for line in (workdir / "trial_1" / "metrics.jsonl")
          .read_text().splitlines() if '"eval"' in line][-1]
  assert last["step"] == 30 and rows[1]["value"] == last["accuracy"]
