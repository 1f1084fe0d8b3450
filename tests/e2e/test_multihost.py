"""Multi-process jobs on this machine (scripts/launch_local.py: 2 processes x
4 CPU devices, gloo collectives) against one process with 8 devices; joining
a job; preemption; a dead process; bad input."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TRAIN, TRAIN_ARGS, xla_flags
from lm.run import restore

LAUNCH = os.path.join(REPO, "scripts", "launch_local.py")
# data x fsdp x tensor: `data` splits the batch across the two processes,
# fsdp and tensor work inside each.
ARGS = [*TRAIN_ARGS, "--heartbeat_timeout=10"]
TIMEOUT = 300  # Seconds any one launch may take before the test fails.


def _env(data_dir, devices=8):
  return dict(os.environ, LM_DATA_DIR=data_dir, PYTHONUNBUFFERED="1",
              XLA_FLAGS=xla_flags(devices))


def _one_process(workdir, data_dir):
  """10 steps (or the rest of them) in one process with 8 devices."""
  result = subprocess.run([sys.executable, TRAIN, f"--workdir={workdir}",
                           *ARGS], cwd=REPO, env=_env(data_dir),
                          capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


class Launch:
  """scripts/launch_local.py in the background; its lines are collected as
  they come, and the processes are always killed at the end."""

  def __init__(self, workdir, data_dir, *extra):
    self.proc = subprocess.Popen(
        [sys.executable, LAUNCH, "--num_processes=2",
         "--devices_per_process=4", "--grace_seconds=120", "--",
         f"--workdir={workdir}", *ARGS, *extra],
        cwd=REPO, env=_env(data_dir, devices=1), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    self.lines = []

  def wait_for(self, pattern, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      line = self.proc.stdout.readline()
      if not line:
        break
      self.lines.append(line)
      if re.search(pattern, line):
        return re.search(pattern, line)
    raise AssertionError(f"no line matched {pattern!r}:\n" + self.output)

  def finish(self, timeout=TIMEOUT):
    try:
      rest, _ = self.proc.communicate(timeout=timeout)
      self.lines.append(rest)
    finally:
      self.kill()
    return self.proc.returncode

  def kill(self):
    if self.proc.poll() is None:
      for pid in self.pids().values():
        _kill(pid)
      self.proc.kill()
      self.proc.communicate()

  def pids(self):
    return {int(m[1]): int(m[2]) for m in re.finditer(
        r"\[launch\] process (\d+): pid (\d+)", self.output)}

  @property
  def output(self):
    return "".join(self.lines)


def _kill(pid, sig=signal.SIGKILL):
  try:
    os.kill(pid, sig)
  except ProcessLookupError:
    pass


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _by_step(records):
  """{(split, step): record}; fails on a duplicate, i.e. a second writer."""
  out = {}
  for r in records:
    key = (r["split"], r["step"])
    assert key not in out, f"{key} written twice: only process 0 may write"
    out[key] = r
  return out


def _assert_same_losses(reference, run):
  a, b = _by_step(_records(reference)), _by_step(_records(run))
  assert sorted(a) == sorted(b)
  assert len([k for k in a if k[0] == "train"]) == 10
  for key in a:
    for metric in ("loss", "bits_per_byte"):
      if metric in a[key]:
        np.testing.assert_allclose(b[key][metric], a[key][metric], rtol=1e-5,
                                   err_msg=f"{metric} at {key}")


@pytest.fixture
def reference(reference_run):
  """10 steps in one process with 8 devices (TRAIN_ARGS: the session's
  shared run; ARGS' heartbeat timeout changes nothing a one-process run
  computes)."""
  return reference_run


def test_two_processes_equal_one_process_across_a_resume(reference, tmp_path,
                                                         data_dir):
  workdir = str(tmp_path / "two")
  first = Launch(workdir, data_dir, "--stop_at_step=5")
  assert first.finish() == 0, first.output[-5000:]
  assert "stopped at step 5" in first.output
  # Resumed onto the hybrid layout a multislice job uses (each process a
  # "slice" here): data across them, fsdp x tensor inside.
  second = Launch(workdir, data_dir, "--config.mesh_dcn.data=2")
  assert second.finish() == 0, second.output[-5000:]
  assert "resumed from step 5" in second.output
  assert "on 8 cpu devices in 2 processes" in second.output
  _assert_same_losses(reference, workdir)
  # The parameters too, restored from both runs' last checkpoints.
  ours = restore.load(workdir, "1,1,1").params
  theirs = restore.load(reference, "1,1,1").params
  for x, y in zip(_leaves(ours), _leaves(theirs)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  # Only process 0 wrote metrics and TensorBoard: one event file per launch,
  # each named after a process-0 pid.
  writers = {int(name.split(".")[-2])
             for name in os.listdir(os.path.join(workdir, "tensorboard"))}
  assert writers == {first.pids()[0], second.pids()[0]}


def _leaves(tree):
  import jax  # noqa: PLC0415
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sigterm_on_one_process_saves_one_checkpoint_on_all(
    reference, tmp_path, data_dir):
  workdir = str(tmp_path / "preempted")
  run = Launch(workdir, data_dir)
  # Process 0 prints the mesh after every process has joined (and so has
  # JAX's SIGTERM handler installed); the steps have not started.
  run.wait_for(r"mesh data=2 x fsdp=2 x tensor=2")
  _kill(run.pids()[1], signal.SIGTERM)
  assert run.finish() == 0, run.output[-5000:]  # Both exited cleanly.
  step = int(re.search(r"all 2 processes save step (\d+)", run.output)[1])
  assert f"stopped at step {step}" in run.output
  assert step < 10
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
  # Resume in one process with 8 devices: the data position carries over
  # (every process saved the same one).
  _one_process(workdir, data_dir)
  _assert_same_losses(reference, workdir)


def test_a_killed_process_ends_the_job_and_nothing_is_lost(
    reference, tmp_path, data_dir):
  workdir = str(tmp_path / "killed")
  first = Launch(workdir, data_dir, "--stop_at_step=4")
  assert first.finish() == 0, first.output[-5000:]
  run = Launch(workdir, data_dir)
  run.wait_for(r"resumed from step 4")
  _kill(run.pids()[1])
  killed_at = time.monotonic()
  status = run.finish(timeout=120)
  # Process 0 ended by itself (the launcher's grace is 120 s), with the
  # coordination service's error, within a bounded time of the heartbeat.
  assert status != 0
  assert time.monotonic() - killed_at < 90
  assert "process 1 was killed by SIGKILL" in run.output
  assert "JAX distributed service detected fatal errors" in run.output
  assert "[launch] killing" not in run.output
  again = Launch(workdir, data_dir)
  assert again.finish() == 0, again.output[-5000:]
  assert "resumed from step 4" in again.output
  _assert_same_losses(reference, workdir)


# Bad input.

def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_processes_that_disagree_on_the_job_all_stop(tmp_path, data_dir):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, TRAIN, f"--workdir={tmp_path}", *ARGS,
       f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
       f"--process_id={i}", "--initialization_timeout=60"],
      cwd=REPO, env=_env(data_dir, devices=4), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i, n in ((0, 2), (1, 3))]
  try:
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode != 0
    assert "The processes disagree about the job" in out, out[-3000:]
    assert "--num_processes [2, 3]" in out
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_a_two_process_import_reads_half_each_and_equals_one_process(
    tmp_path):
  """scripts/import_hf.py as a 2 x 4-device job with FSDP over all 8: each
  process reads only its devices' halves (plus the replicated norms), and
  the run holds the same bits as a one-process import."""
  import torch  # noqa: PLC0415 - a test dependency.
  import transformers  # noqa: PLC0415
  hf_dir = tmp_path / "hf"
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(
      vocab_size=256, hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64)).save_pretrained(hf_dir)
  args = [f"--hf_dir={hf_dir}", "--tokenizer=byte", "--mesh=fsdp=8"]
  script = os.path.join(REPO, "scripts", "import_hf.py")
  launch = subprocess.run(
      [sys.executable, LAUNCH, "--num_processes=2", "--devices_per_process=4",
       f"--script={script}", "--", f"--workdir={tmp_path / 'two'}", *args],
      cwd=REPO, env=dict(os.environ, XLA_FLAGS=xla_flags(1)),
      capture_output=True, text=True, timeout=TIMEOUT)
  assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
  read = [float(m) for m in re.findall(r"this process read ([\d.]+) MiB",
                                       launch.stdout)]
  one = subprocess.run(
      [sys.executable, script, f"--workdir={tmp_path / 'one'}", *args],
      cwd=REPO, env=dict(os.environ, XLA_FLAGS=xla_flags(8)),
      capture_output=True, text=True, timeout=TIMEOUT)
  assert one.returncode == 0, one.stderr[-3000:]
  total = float(re.search(r"this process read ([\d.]+) MiB", one.stdout)[1])
  assert len(read) == 2 and all(r < 0.6 * total for r in read), (
      read, total)
  a, b = (jax_params(tmp_path / name) for name in ("two", "one"))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def jax_params(workdir):
  import jax  # noqa: PLC0415
  return jax.tree.leaves(jax.device_get(restore.load(workdir,
                                                     "1,1,1").params))
