r"""Multi-process runs on this machine against one process: equality,
throughput, preemption and a killed process, timed. Prints a markdown table.

    python benchmarks/multihost.py [--steps=60] [--out=runs/multihost]

2 processes x 4 simulated CPU devices (scripts/launch_local.py, gloo) against
1 process x 8, the tiny LM on mesh data=2 x fsdp=2 x tensor=2.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEPS = flags.DEFINE_integer("steps", 60, "Steps of the throughput runs.")
_OUT = flags.DEFINE_string("out", os.path.join(REPO, "runs", "multihost"),
                           "Scratch directory (emptied first).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 10,
                                  "--heartbeat_timeout of the killed run.")

ARGS = ["--config=configs/lm.py:tiny", "--config.train.log_every=1",
        "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
        "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2"]


def one_process(workdir, *extra):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train.py"),
                  f"--workdir={workdir}", *ARGS, *extra], cwd=REPO, env=env,
                 check=True, capture_output=True)


def launch(workdir, *extra, background=False):
  cmd = [sys.executable, os.path.join(REPO, "scripts", "launch_local.py"),
         "--num_processes=2", "--devices_per_process=4", "--grace_seconds=300",
         "--", f"--workdir={workdir}", *ARGS, *extra]
  if background:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        check=True).stdout


def train_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}


def tokens_per_sec(workdir):
  """Median over the steps after the first 5 (compile, warm-up)."""
  rates = sorted(r["tokens_per_sec"] for s, r in train_records(workdir).items()
                 if s > 5)
  return rates[len(rates) // 2]


def wait_for(proc, pattern, lines):
  for line in proc.stdout:
    lines.append(line)
    if re.search(pattern, line):
      return
  raise RuntimeError("".join(lines[-50:]))


def main(argv):
  del argv
  shutil.rmtree(_OUT.value, ignore_errors=True)
  d = lambda name: os.path.join(_OUT.value, name)  # noqa: E731
  rows = []
  steps = f"--config.train.steps={_STEPS.value}"

  # Equality over 10 steps with a stop/resume at 5.
  one_process(d("one"), "--config.train.steps=10")
  launch(d("two"), "--config.train.steps=10", "--stop_at_step=5")
  launch(d("two"), "--config.train.steps=10")
  a, b = train_records(d("one")), train_records(d("two"))
  diff = max(abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"]) for s in a)
  rows.append(("10 steps, stop + resume at 5: max relative loss difference",
               f"{diff:.1e}"))

  # Throughput.
  one_process(d("one_tp"), steps)
  launch(d("two_tp"), steps)
  t1, t2 = tokens_per_sec(d("one_tp")), tokens_per_sec(d("two_tp"))
  rows.append((f"tokens/s, 1 process x 8 devices ({_STEPS.value} steps, "
               "median)", f"{t1:,.0f}"))
  rows.append(("tokens/s, 2 processes x 4 devices (gloo between them)",
               f"{t2:,.0f} ({t2 / t1:.2f}x)"))

  # SIGTERM on process 1: seconds until both have saved and exited.
  lines = []
  proc = launch(d("term"), "--config.train.steps=100000", background=True)
  wait_for(proc, r"step +20/", lines)
  pid = int(re.search(r"process 1: pid (\d+)", "".join(lines))[1])
  start = time.monotonic()
  os.kill(pid, signal.SIGTERM)
  rest, _ = proc.communicate(timeout=300)
  took = time.monotonic() - start
  saved = re.search(r"save step (\d+)", rest)[1]
  rows.append(("SIGTERM to process 1 -> both saved step "
               f"{saved} and exited (status {proc.returncode})",
               f"{took:.1f} s"))

  # SIGKILL on process 1: seconds until process 0 has ended by itself.
  lines = []
  proc = launch(d("kill"), "--config.train.steps=100000",
                f"--heartbeat_timeout={_HEARTBEAT.value}", background=True)
  wait_for(proc, r"step +20/", lines)
  pid = int(re.search(r"process 1: pid (\d+)", "".join(lines))[1])
  start = time.monotonic()
  os.kill(pid, signal.SIGKILL)
  proc.communicate(timeout=600)
  took = time.monotonic() - start
  rows.append((f"SIGKILL to process 1 -> process 0 ended (heartbeat_timeout "
               f"{_HEARTBEAT.value} s, launcher status {proc.returncode})",
               f"{took:.1f} s"))

  print("| measurement | value |\n|---|---|")
  for name, value in rows:
    print(f"| {name} | {value} |")


if __name__ == "__main__":
  app.run(main)
