r"""Multi-process runs on this machine against one process: equality,
throughput, preemption and a killed process, timed.

    python benchmarks/multihost.py [--steps=60]

2 processes x 4 simulated CPU devices (scripts/launch_local.py, gloo) against
1 process x 8, the tiny LM on mesh data=2 x fsdp=2 x tensor=2, logging every
step, scratch runs under --workdir (emptied first):
  equality:   10 steps in one process; 10 steps in two, stopped at 5 and
              resumed; the largest relative difference of the train losses;
  throughput: --steps steps each way, the median tokens/s of the steps after
              the first 5 (compile, warm-up);
  SIGTERM:    to process 1 once step --signal_step is logged: seconds until
              both processes have saved and the launcher has exited (it must
              exit 0: a failed preemption raises);
  SIGKILL:    to process 1 once step --signal_step is logged: seconds until
              process 0 has ended by itself (the coordination service's
              heartbeat timeout, --heartbeat_timeout).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

NAME = "multihost"

ARGS = ["--config=configs/lm.py:tiny", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
        "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2"]


def one_process(workdir: Path, *extra) -> None:
  env = common.simulated_devices()
  common.run([sys.executable, "scripts/train.py", f"--workdir={workdir}",
              *ARGS, *extra], env=env)


def _launch_cmd(workdir: Path, *extra) -> list[str]:
  return [sys.executable, "scripts/launch_local.py", "--num_processes=2",
          "--devices_per_process=4", "--grace_seconds=300", "--",
          f"--workdir={workdir}", *ARGS, *extra]


def launch(workdir: Path, *extra) -> str:
  return common.run(_launch_cmd(workdir, *extra)).stdout


def train_records(workdir: Path) -> dict[int, dict]:
  with open(workdir / "metrics.jsonl") as f:
    return {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}


def tokens_per_sec(workdir: Path, steps: int) -> float:
  """Median over the steps after the first 5 (compile, warm-up)."""
  records = train_records(workdir)
  if max(records, default=0) != steps:
    raise RuntimeError(f"{workdir}: no train record at step {steps}")
  rates = sorted(r["tokens_per_sec"] for s, r in records.items() if s > 5)
  return rates[len(rates) // 2]


def _wait_for(proc: subprocess.Popen, pattern: str, lines: list[str]) -> None:
  for line in proc.stdout:
    lines.append(line)
    if re.search(pattern, line):
      return
  raise RuntimeError("the launcher ended before printing "
                     f"{pattern!r}:\n" + "".join(lines[-50:]))


def signal_process_1(workdir: Path, signum: int, at_step: int, *extra,
                     timeout: float) -> tuple[float, int, str]:
  """Launches 2 processes, sends `signum` to process 1 once step `at_step`
  is logged; (seconds until the launcher has exited, its status, its output
  after the signal)."""
  proc = subprocess.Popen(
      _launch_cmd(workdir, "--config.train.steps=100000", *extra),
      cwd=common.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  try:
    lines = []
    _wait_for(proc, rf"step +{at_step}/", lines)
    pid = int(re.search(r"process 1: pid (\d+)", "".join(lines))[1])
    start = time.monotonic()
    os.kill(pid, signum)
    rest, _ = proc.communicate(timeout=timeout)
    return time.monotonic() - start, proc.returncode, rest
  finally:
    if proc.poll() is None:  # Failed: the launcher forwards SIGTERM.
      proc.terminate()
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60,
                      help="steps of the throughput runs")
  parser.add_argument("--signal_step", type=int, default=20,
                      help="the logged step after which process 1 is "
                      "signalled")
  parser.add_argument("--heartbeat_timeout", type=int, default=10,
                      help="--heartbeat_timeout of the killed run")
  parser.add_argument("--workdir", default=str(common.REPO / "runs" / NAME),
                      help="scratch directory (emptied first)")
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  if args.steps <= 6:
    parser.error("--steps must be > 6 (the first 5 are not timed)")
  root = Path(args.workdir).resolve()
  shutil.rmtree(root, ignore_errors=True)
  data = {}

  # Equality over 10 steps with a stop/resume at 5.
  ten = ["--config.train.steps=10", "--config.optimizer.warmup_steps=5"]
  one_process(root / "one", *ten)
  launch(root / "two", *ten, "--stop_at_step=5")
  launch(root / "two", *ten)
  a, b = train_records(root / "one"), train_records(root / "two")
  if max(a, default=0) != 10 or not set(a) <= set(b):
    raise RuntimeError(f"steps logged: one process {sorted(a)}, two "
                       f"{sorted(b)}")
  data["equality"] = dict(steps=10, stop_at_step=5, max_relative_loss_diff=max(
      abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"]) for s in a))
  print(data, flush=True)

  # Throughput.
  steps = [f"--config.train.steps={args.steps}",
           "--config.optimizer.warmup_steps=0"]  # Timing only: any --steps.
  one_process(root / "one_tp", *steps)
  launch(root / "two_tp", *steps)
  data["throughput"] = dict(
      steps=args.steps,
      one_process=tokens_per_sec(root / "one_tp", args.steps),
      two_processes=tokens_per_sec(root / "two_tp", args.steps))
  print(data, flush=True)

  # SIGTERM on process 1: seconds until both have saved and exited.
  took, status, rest = signal_process_1(root / "term", signal.SIGTERM,
                                        args.signal_step, timeout=300)
  saved = re.search(r"save step (\d+)", rest)
  if status != 0 or not saved:
    raise RuntimeError(f"SIGTERM: launcher status {status}, saved step "
                       f"{saved and saved[1]}:\n{rest[-3000:]}")
  data["sigterm"] = dict(signal_step=args.signal_step,
                         saved_step=int(saved[1]), status=status, seconds=took)
  print(data, flush=True)

  # SIGKILL on process 1: seconds until process 0 has ended by itself.
  took, status, rest = signal_process_1(
      root / "kill", signal.SIGKILL, args.signal_step,
      f"--heartbeat_timeout={args.heartbeat_timeout}", timeout=600)
  if status == 0:
    raise RuntimeError(f"SIGKILL: the launcher exited 0:\n{rest[-3000:]}")
  data["sigkill"] = dict(signal_step=args.signal_step,
                         heartbeat_timeout=args.heartbeat_timeout,
                         status=status,
                         seconds=took)
  print(data, flush=True)

  print(f"wrote {common.write(NAME, data, args.out)}")


def tables(results: dict) -> dict[str, str]:
  eq, tp = results["equality"], results["throughput"]
  term, kill = results["sigterm"], results["sigkill"]
  ratio = tp["two_processes"] / tp["one_process"]
  rows = [
      [f"{eq['steps']} steps, stop + resume at {eq['stop_at_step']}: max "
       "relative loss difference", f"{eq['max_relative_loss_diff']:.1e}"],
      [f"tokens/s, 1 process x 8 devices ({tp['steps']} steps, median)",
       f"{tp['one_process']:,.0f}"],
      ["tokens/s, 2 processes x 4 devices (gloo between them)",
       f"{tp['two_processes']:,.0f} ({ratio:.2f}x)"],
      [f"SIGTERM to process 1 -> both saved step {term['saved_step']} and "
       f"exited (status {term['status']})", f"{term['seconds']:.1f} s"],
      [f"SIGKILL to process 1 -> process 0 ended (heartbeat_timeout "
       f"{kill['heartbeat_timeout']} s, launcher status {kill['status']})",
       f"{kill['seconds']:.1f} s"]]
  return {"table": common.markdown(["measurement", "value"], rows, "lr")}


if __name__ == "__main__":
  main()
