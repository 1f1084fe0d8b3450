"""Faults injected into real runs of scripts/train.py: each ends with a run
directory that resumes, nothing lost beyond the last complete checkpoint,
and at most one line saying what happened (docs/troubleshooting.md)."""
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import train_script

# 4 steps, a checkpoint every 2: checkpoints 2 and 4.
SHORT = ["--config.train.steps=4", "--config.train.checkpoint_every=2",
         "--config.train.eval_every=0"]
FOREVER = ["--config.train.steps=100000", "--config.train.eval_every=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> Path:
  """A finished run with checkpoints 2 and 4 (copied by each test)."""
  workdir = tmp_path_factory.mktemp("faults") / "run"
  train_script(str(workdir), data_dir, *SHORT)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  return workdir


def _copy(trained: Path, tmp_path: Path) -> Path:
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


def _array_file(workdir: Path, step: int) -> Path:
  """The biggest array file of a checkpoint's train state."""
  folder = workdir / "checkpoints" / str(step) / "state" / "ocdbt.process_0"
  return max((folder / "d").iterdir(), key=lambda p: p.stat().st_size)


def _damage(path: Path, how: str) -> None:
  if how == "truncated":
    with path.open("r+b") as f:
      f.truncate(path.stat().st_size // 2)
  elif how == "garbage":
    path.write_bytes(os.urandom(path.stat().st_size))
  else:
    path.unlink()


def _errors(result) -> list[str]:
  return [line for line in result.stderr.splitlines()
          if line.startswith("error: ")]


@pytest.mark.parametrize("how", ["truncated", "garbage", "deleted"])
def test_a_damaged_latest_checkpoint_falls_back_to_an_intact_one(
    how, trained, tmp_path, data_dir):
  workdir = _copy(trained, tmp_path)
  _damage(_array_file(workdir, 4), how)
  result = train_script(str(workdir), data_dir, *SHORT[1:],
                        "--config.train.steps=6")
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  corrupt = workdir / "checkpoints" / "corrupt" / "4"
  assert (f"checkpoint step 4 in {workdir / 'checkpoints'} cannot be read"
          in result.stdout), result.stdout[-3000:]
  assert f"moved it to {corrupt} (nothing deleted)" in result.stdout
  assert "using step 2, the newest intact checkpoint" in result.stdout
  assert "resumed from step 2" in result.stdout
  assert corrupt.is_dir()  # Kept for a look, never deleted.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4", "6"]


def test_no_readable_checkpoint_is_one_line_and_moves_nothing(
    trained, tmp_path, data_dir):
  workdir = _copy(trained, tmp_path)
  for step in (2, 4):
    _damage(_array_file(workdir, step), "truncated")
  result = train_script(str(workdir), data_dir, *SHORT, check=False)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  [error] = _errors(result)
  assert f"no checkpoint in {workdir / 'checkpoints'} can be read" in error
  assert "step 4:" in error and "step 2:" in error
  assert "Nothing was moved" in error
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def _start(workdir: Path, data_dir: str, *extra: str):
  proc = train_script(str(workdir), data_dir, *FOREVER, *extra,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      text=True)
  for line in proc.stdout:  # Until training is under way.
    if line.startswith("step") and "train" in line:
      return proc, line
  raise AssertionError(proc.stderr.read()[-3000:])


def test_a_failed_save_stops_the_run_with_one_line(tmp_path, data_dir):
  """The checkpoint directory turns into a file under a running job (as a
  vanished or unwritable mount would): the next save fails, and the run
  stops there, naming the step, the directory and the cause."""
  workdir = tmp_path / "run"
  proc, _ = _start(workdir, data_dir, "--config.train.checkpoint_every=3")
  checkpoints = workdir / "checkpoints"
  shutil.rmtree(checkpoints)
  checkpoints.write_text("not a directory")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 1, (out + err)[-3000:]
  assert "Traceback" not in err, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, err[-3000:]
  assert f"in {checkpoints} failed" in errors[0]
  assert "saving checkpoint step" in errors[0]
  assert checkpoints.read_text() == "not a directory"


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(
    tmp_path, data_dir):
  workdir = tmp_path / "run"
  first, _ = _start(workdir, data_dir, "--config.train.checkpoint_every=0")
  try:
    config = (workdir / "config.json").read_text()
    second = train_script(str(workdir), data_dir, *FOREVER, check=False)
    assert second.returncode == 1
    assert "Traceback" not in second.stderr, second.stderr[-3000:]
    [error] = _errors(second)
    assert f"{workdir} is in use by process {first.pid}" in error
    assert (workdir / "config.json").read_text() == config
    assert first.poll() is None  # The first run goes on.
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
  # The kill -9 left its lock behind; the next run takes it over.
  assert json.loads((workdir / "run.lock").read_text())["pid"] == first.pid
  third = train_script(str(workdir), data_dir, "--config.train.steps=2")
  assert (f"taking over the lock of {workdir}: process {first.pid} on this "
          "host, which held it, is gone") in third.stdout
  assert not (workdir / "run.lock").exists()  # Released at exit.


def test_sigterm_during_an_eval_saves_and_resumes(tmp_path, data_dir):
  """SIGTERM while the step-2 eval runs (many eval batches): the run
  finishes that eval, saves step 2, exits 0, and a rerun resumes there."""
  workdir = tmp_path / "run"
  proc, line = _start(workdir, data_dir, "--config.train.eval_every=2",
                      "--config.train.eval_batches=200",
                      "--config.train.checkpoint_every=0")
  while not re.match(r"step +2/", line):
    line = proc.stdout.readline()
  proc.send_signal(signal.SIGTERM)  # The eval of step 2 starts now.
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, (out + err)[-3000:]
  assert "stopped at step 2" in out
  result = train_script(str(workdir), data_dir, "--config.train.steps=3",
                        "--config.train.eval_every=0")
  assert "resumed from step 2" in result.stdout


def test_kill_9_during_saves_resumes_from_the_last_complete_one(
    tmp_path, data_dir):
  """A checkpoint every step, so the kill lands in or near a save: what
  survives is the complete checkpoints (a partial one stays a temporary
  directory), and the rerun resumes from the newest of them."""
  workdir = tmp_path / "run"
  proc, _ = _start(workdir, data_dir, "--config.train.checkpoint_every=1")
  for line in proc.stdout:
    if re.match(r"step +4/", line):
      break
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  complete = [int(p.name) for p in (workdir / "checkpoints").iterdir()
              if p.name.isdigit()]
  assert complete, os.listdir(workdir / "checkpoints")
  result = train_script(str(workdir), data_dir,
                        f"--config.train.steps={max(complete) + 1}")
  assert f"resumed from step {max(complete)}" in result.stdout
  assert "taking over the lock" in result.stdout
  assert not [p for p in (workdir / "checkpoints").iterdir()
              if "tmp" in p.name]
