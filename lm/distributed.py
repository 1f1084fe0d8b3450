"""Joining a multi-process JAX job (one process per host, or per GPU).

Every process of a job runs the same program; `jax.distributed.initialize`
connects them through a coordination service that process 0 hosts, after
which `jax.devices()` lists every process's devices and one mesh spans them.

How a process learns its place, first match wins:
1. explicit values: the flags `--coordinator_address=HOST:PORT
   --num_processes=N --process_id=I`, else the environment variables
   `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
2. a cluster JAX detects by itself (SLURM `srun`, Open MPI, Cloud TPU VMs,
   GKE TPU pods): `jax.distributed.initialize()` with no arguments reads it
   from there;
3. otherwise (JAX says it found no coordinator, or SLURM / Open MPI say the
   job has one task): a single process, no coordination service. Any other
   failure of JAX's detection stops the process with its message: a TPU
   worker must never train alone because detection broke.

Failures are made to end, and to say why:
- the flags are checked before anything starts (all three or none;
  0 <= I < N; HOST:PORT);
- a process other than 0 waits at most `--initialization_timeout` seconds
  for the coordinator's port to accept connections, then raises naming the
  flag; process 0 checks first that its port is free (a second process 0,
  or a port in use, would otherwise kill the first job);
- after joining, the processes compare their `--num_processes` and
  `--process_id` (an all-gather) and all raise if they disagree;
- a process that dies stops sending heartbeats: the coordination service
  ends every other process within `--heartbeat_timeout` seconds ("Terminating
  process because the JAX distributed service detected fatal errors").
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time

import jax

from lm import checks

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
       "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


class DistributedError(checks.UserError, RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """Explicit placement of this process in a job."""
  coordinator_address: str
  num_processes: int
  process_id: int

  @property
  def host(self) -> str:
    return self.coordinator_address.rsplit(":", 1)[0].strip("[]")

  @property
  def port(self) -> int:
    return int(self.coordinator_address.rsplit(":", 1)[1])


def job_spec(coordinator_address: str | None = None,
             num_processes: int | None = None,
             process_id: int | None = None,
             environ=os.environ) -> JobSpec | None:
  """The explicit job this process belongs to (flags over environment), or
  None when nothing was given. Raises DistributedError on a partial or
  inconsistent set, naming the flag."""
  given = {"coordinator_address": coordinator_address,
           "num_processes": num_processes, "process_id": process_id}
  for key, var in ENV.items():
    if given[key] is None and environ.get(var, "") != "":
      given[key] = environ[var]
  if all(v is None for v in given.values()):
    return None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise DistributedError(
        "A multi-process job needs all of --coordinator_address, "
        "--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, "
        f"JAX_NUM_PROCESSES, JAX_PROCESS_ID); --{missing[0]} is missing. Give "
        "all three, or none for a single process.")
  address = str(given["coordinator_address"])
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(
        f"--coordinator_address={address!r} is not HOST:PORT (e.g. "
        "10.0.0.2:1234): process 0's host name or IP and a free port.")
  try:
    n, i = int(given["num_processes"]), int(given["process_id"])
  except ValueError as e:
    raise DistributedError(
        "--num_processes and --process_id must be integers, got "
        f"{given['num_processes']!r} and {given['process_id']!r}.") from e
  if n < 1:
    raise DistributedError(f"--num_processes={n} must be at least 1.")
  if not 0 <= i < n:
    raise DistributedError(
        f"--process_id={i} is outside [0, {n}) for --num_processes={n}: "
        f"number the processes 0 .. {n - 1}, each exactly once.")
  return JobSpec(address, n, i)


def single_task_scheduler(environ=os.environ) -> bool:
  """SLURM or Open MPI says this job has one task: nothing to join (JAX
  would otherwise start a coordination service for a job of one)."""
  return any(environ.get(var, "") == "1"
             for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


# What jax.distributed.initialize() raises when it was given no coordinator
# and recognized no cluster (jax/_src/distributed.py): the one failure that
# means "a single process". Anything else it raises is a real failure.
NO_CLUSTER = "coordinator_address should be defined"


def _initialize_detected(**timeouts) -> bool:
  """Joins the job of a cluster JAX detects by itself (SLURM, Open MPI,
  Cloud TPU, GKE), through its public `jax.distributed.initialize()`.
  False when JAX recognized none; any other failure propagates."""
  try:
    jax.distributed.initialize(**timeouts)
  except ValueError as e:
    if NO_CLUSTER in str(e):
      return False
    raise DistributedError(
        f"JAX detected a cluster but could not join it: {e}") from e
  return True


def _check_port_free(spec: JobSpec) -> None:
  with socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET)\
      as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", spec.port))
    except OSError as e:
      raise DistributedError(
          f"--process_id=0 hosts the coordinator on port {spec.port} "
          f"(--coordinator_address={spec.coordinator_address}), but the port "
          f"is taken ({e.strerror}). Another process was probably started "
          "with --process_id=0 (each id once), or a previous job still runs; "
          "stop it or pick another port.") from e


def _wait_for_coordinator(spec: JobSpec, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  error = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((spec.host, spec.port), timeout=2):
        return
    except OSError as e:
      error = e
      time.sleep(0.25)
  raise DistributedError(
      f"Process {spec.process_id} could not reach the coordinator at "
      f"--coordinator_address={spec.coordinator_address} within "
      f"--initialization_timeout={timeout:g} s ({error}). Check that process "
      "0 runs, that HOST is its address as seen from this host, and that the "
      "port is open between hosts.")


def _check_agreement(spec: JobSpec) -> None:
  """Every process must have been told the same job (an all-gather)."""
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  mine = np.array([spec.num_processes, spec.process_id], np.int32)
  everyone = np.asarray(multihost_utils.process_allgather(mine))
  ids = sorted(int(i) for i in everyone[:, 1])
  counts = sorted({int(n) for n in everyone[:, 0]})
  if counts != [jax.process_count()] or ids != list(range(jax.process_count())):
    raise DistributedError(
        f"The processes disagree about the job: the coordinator runs "
        f"{jax.process_count()} processes, which were given --num_processes "
        f"{[int(n) for n in everyone[:, 0]]} and --process_id {ids}. Give "
        "every process the same --num_processes and a distinct --process_id.")


def _cpu_collectives() -> None:
  """CPU devices of different processes talk through gloo (GPU uses NCCL
  and TPU its ICI/DCN whatever this says). Read when the backend starts,
  which is after joining."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *,
               initialization_timeout: int = 300,
               heartbeat_timeout: int = 100) -> str:
  """Joins the job this process belongs to (see the module docstring).

  Must run before anything touches a JAX backend. Returns a one-line
  description for the log.
  """
  spec = job_spec(coordinator_address, num_processes, process_id)
  if spec is None and single_task_scheduler():
    return "single process"
  timeouts = dict(initialization_timeout=initialization_timeout,
                  heartbeat_timeout_seconds=heartbeat_timeout,
                  shutdown_timeout_seconds=heartbeat_timeout)
  if spec is None:
    if not _initialize_detected(**timeouts):
      return "single process"
    _cpu_collectives()
    return (f"process {jax.process_index()} of {jax.process_count()} "
            "(cluster detected by JAX)")
  _cpu_collectives()
  if spec.num_processes == 1:
    return "single process"
  if spec.process_id == 0:
    _check_port_free(spec)
  else:
    _wait_for_coordinator(spec, initialization_timeout)
  # If the coordination service ends this process from here on, this line
  # says which flags to look at.
  print(f"[process {spec.process_id}] joining a job of {spec.num_processes} "
        f"processes at {spec.coordinator_address} (waiting up to "
        f"{initialization_timeout} s for all; a process killed by 'the JAX "
        "distributed service' means a peer died, or --num_processes / "
        "--process_id differ between processes)", file=sys.stderr, flush=True)
  jax.distributed.initialize(spec.coordinator_address, spec.num_processes,
                             spec.process_id, **timeouts)
  _check_agreement(spec)
  return f"process {spec.process_id} of {spec.num_processes}"
