r"""Runs a multi-process job on this machine: N CPU processes, each with its
own simulated devices, joined by `jax.distributed` (collectives over gloo).

    python scripts/launch_local.py --num_processes=2 --devices_per_process=4 \
        -- --config=configs/lm.py:tiny --workdir=runs/mh

Everything after `--` goes to scripts/train.py (or --script), plus
--coordinator_address/--num_processes/--process_id. It is the same code path
as a pod or cluster, so multi-host behaviour (sharded input, process-0-only
logs, coordinated checkpoints and preemption) is testable without one.

Output lines are prefixed with the process id. SIGTERM to this launcher is
forwarded to every process (a preemption: they checkpoint together and
exit); Ctrl-C reaches them through the terminal. If a process fails, the
others are given --grace_seconds to end on their own (the coordination
service ends them) and are then killed; the exit status is the first
failure's.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from lm.checks import UsageError
from lm.run import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_N = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4,
                                "Simulated CPU devices in each process.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port (0: a free one).")
_SCRIPT = flags.DEFINE_string("script", os.path.join(REPO, "scripts",
                                                     "train.py"),
                              "The program every process runs.")
_GRACE = flags.DEFINE_float(
    "grace_seconds", 60.0, "After one process fails, how long the others may "
    "take to end before they are killed.")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"{prefix}{line}")
    out.flush()


def launch(n: int, devices: int, args: list[str], *, script: str,
           port: int = 0, grace: float = 60.0) -> int:
  """Starts the processes, waits for all of them; returns an exit status."""
  port = port or free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  flag = f"--xla_force_host_platform_device_count={devices}"
  env["XLA_FLAGS"] = " ".join(
      [f for f in env.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")] + [flag])
  procs, pumps = [], []
  for i in range(n):
    cmd = [sys.executable, script, *args,
           f"--coordinator_address=127.0.0.1:{port}",
           f"--num_processes={n}", f"--process_id={i}"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    procs.append(p)
    print(f"[launch] process {i}: pid {p.pid}", flush=True)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", sys.stdout),
                         daemon=True)
    t.start()
    pumps.append(t)

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
  old = signal.signal(signal.SIGTERM, forward)
  # Ctrl-C reaches the children through the terminal's process group; the
  # launcher itself keeps waiting for them to save and exit.
  old_int = signal.signal(signal.SIGINT, lambda *a: None)
  try:
    status, failed_at = 0, None
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        if p.poll() not in (None, 0) and status == 0:
          status, failed_at = p.returncode, time.monotonic()
          how = (f"was killed by {signal.Signals(-p.returncode).name}"
                 if p.returncode < 0 else
                 f"exited with status {p.returncode}")
          print(f"[launch] process {i} {how}; waiting up to {grace:g} s for "
                "the others to end", flush=True)
      if failed_at is not None and time.monotonic() - failed_at > grace:
        for i, p in enumerate(procs):
          if p.poll() is None:
            print(f"[launch] killing process {i}", flush=True)
            p.kill()
      time.sleep(0.1)
    for p in procs:
      if status == 0 and p.returncode != 0:
        status = p.returncode
  finally:
    signal.signal(signal.SIGTERM, old)
    signal.signal(signal.SIGINT, old_int)
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for t in pumps:
      t.join(timeout=5)
  # A signal death is -N from Popen; a shell reports 128 + N.
  return status if status >= 0 else 128 - status


def main(argv):
  if _N.value < 1 or _DEVICES.value < 1:
    raise UsageError("--num_processes and --devices_per_process must be "
                     ">= 1.")
  sys.exit(launch(_N.value, _DEVICES.value, argv[1:], script=_SCRIPT.value,
                  port=_PORT.value, grace=_GRACE.value))


if __name__ == "__main__":
  cli.run(main)
