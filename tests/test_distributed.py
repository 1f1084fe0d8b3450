"""Joining a multi-process job: the flags, the coordinator, and JAX's own
cluster detection through its public API (failures are loud)."""
import socket
import subprocess
import sys
import time

import jax
import pytest

from lm import distributed


def test_job_flags_are_checked_before_anything_starts():
  with pytest.raises(distributed.DistributedError, match="--process_id"):
    distributed.job_spec("127.0.0.1:1234", 2, environ={})
  with pytest.raises(distributed.DistributedError,
                     match=r"--process_id=2 is outside \[0, 2\)"):
    distributed.job_spec("127.0.0.1:1234", 2, 2, environ={})
  with pytest.raises(distributed.DistributedError,
                     match="--coordinator_address='h1234' is not HOST:PORT"):
    distributed.job_spec("h1234", 2, 0, environ={})
  with pytest.raises(distributed.DistributedError, match="--num_processes=0"):
    distributed.job_spec("h:1234", 0, 0, environ={})
  assert distributed.job_spec(environ={}) is None
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:99", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.job_spec(environ=env) == distributed.JobSpec(
      "10.0.0.2:99", 4, 3)
  assert distributed.job_spec(process_id=1, environ=env).process_id == 1


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_unreachable_coordinator_fails_after_the_timeout():
  start = time.monotonic()
  with pytest.raises(distributed.DistributedError,
                     match="--coordinator_address=127.0.0.1:.*"
                     "--initialization_timeout=2"):
    distributed.initialize(f"127.0.0.1:{_free_port()}", 2, 1,
                           initialization_timeout=2)
  assert time.monotonic() - start < 10


def test_a_second_process_zero_is_refused():
  with socket.socket() as taken:
    taken.bind(("", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(distributed.DistributedError,
                       match="--process_id=0 .* port is taken"):
      distributed.initialize(f"127.0.0.1:{port}", 2, 0)


@pytest.fixture
def no_scheduler(monkeypatch):
  """No job flags or variables, no scheduler; joining changes no config."""
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
              "JAX_PROCESS_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed, "_cpu_collectives", lambda: None)


def test_no_cluster_is_a_single_process(no_scheduler, monkeypatch):
  calls = []

  def no_cluster(**kwargs):
    calls.append(kwargs)
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
  assert distributed.initialize() == "single process"
  assert calls, "JAX's own detection was not asked"


def test_a_broken_cluster_detection_fails_loudly(no_scheduler, monkeypatch):
  """A TPU worker whose detection fails must not train on its own."""
  def broken(**kwargs):
    raise ValueError("could not read the TPU worker's metadata")
  monkeypatch.setattr(jax.distributed, "initialize", broken)
  with pytest.raises(distributed.DistributedError,
                     match="detected a cluster but could not join it.*"
                     "metadata"):
    distributed.initialize()

  def crashed(**kwargs):
    raise RuntimeError("coordination service unavailable")
  monkeypatch.setattr(jax.distributed, "initialize", crashed)
  with pytest.raises(RuntimeError, match="coordination service"):
    distributed.initialize()


def test_a_detected_cluster_is_joined(no_scheduler, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  assert "cluster detected by JAX" in distributed.initialize(
      heartbeat_timeout=7)
  assert calls == [dict(initialization_timeout=300,
                        heartbeat_timeout_seconds=7,
                        shutdown_timeout_seconds=7)]


def test_a_single_task_scheduler_job_joins_nothing(no_scheduler, monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: pytest.fail("initialize was called"))
  assert distributed.initialize() == "single process"


def test_jax_says_no_cluster_in_the_words_we_read():
  """The one failure read as "single process" is what this JAX raises
  when it finds no cluster (a fresh process: nothing started yet)."""
  env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [sys.executable, "-c", "import jax; jax.distributed.initialize()"],
      env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert distributed.NO_CLUSTER in out.stderr, out.stderr[-2000:]
