"""lm/cpu.py: which backend a process will run on, and malloc asking for
huge pages so that XLA:CPU's temporaries are not faulted in 4 KiB at a
time at every call."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from lm import cpu

# Runs `cpu.use_huge_pages()` first, as a script does, then a program whose
# temporaries (an f32[65536, 512] product: 128 MiB) are above glibc's largest
# mmap threshold (32 MiB); prints GLIBC_TUNABLES, its pid before and after,
# the temporary bytes and the minor page faults of each call after the
# first.
PROGRAM = """
import json, os, resource, sys
pid = int(os.environ.get("FIRST_PID", os.getpid()))
os.environ["FIRST_PID"] = str(pid)
from lm import cpu
cpu.use_huge_pages()
import jax, jax.numpy as jnp
def f(x, w):
  h = jnp.tanh(x @ w)
  return (h @ w).sum() + h.sum()
x = jnp.ones((65536, 512), jnp.float32)
w = jnp.full((512, 512), 1e-3, jnp.float32)
compiled = jax.jit(f).lower(x, w).compile()
jax.block_until_ready(compiled(x, w))
faults = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(compiled(x, w))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "same_pid": pid == os.getpid(), "faults": faults,
                  "temp": compiled.memory_analysis().temp_size_in_bytes}))
"""


@pytest.mark.parametrize("environ, want", [
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "cpu,tpu"}, True),
    ({"JAX_PLATFORMS": "tpu,cpu"}, False),
    ({"JAX_PLATFORMS": "cuda"}, False),
])
def test_the_platform_is_read_from_jax_platforms(environ, want):
  assert cpu.jax_runs_on_cpu(environ) is want


def test_without_jax_platforms_a_plugin_and_its_device_mean_an_accelerator(
    monkeypatch):
  installed, devices = set(), set()
  monkeypatch.setattr(cpu.importlib.util, "find_spec",
                      lambda name: object() if name in installed else None)
  monkeypatch.setattr(cpu.os.path, "exists", lambda path: path in devices)
  assert cpu.jax_runs_on_cpu({})
  installed.add("libtpu")
  assert cpu.jax_runs_on_cpu({})  # No TPU here: jax falls back to the CPU.
  devices.add("/dev/accel0")
  assert not cpu.jax_runs_on_cpu({})


@pytest.mark.parametrize("environ, installed, devices, want", [
    ({}, {"libtpu"}, set(), True),  # The TPU probe loads it; no TPU.
    ({}, set(), set(), False),  # No libtpu.
    ({"JAX_PLATFORMS": "cpu"}, {"libtpu"}, set(), False),  # No probe.
    ({"JAX_PLATFORMS": "cpu,tpu"}, {"libtpu"}, set(), True),
    ({}, {"libtpu"}, {"/dev/accel0"}, False),  # A TPU: not the CPU.
])
def test_libtpus_profiler_is_flagged_where_jax_loads_it_for_the_cpu(
    monkeypatch, environ, installed, devices, want):
  monkeypatch.setattr(cpu.importlib.util, "find_spec",
                      lambda name: object() if name in installed else None)
  monkeypatch.setattr(cpu.os.path, "exists", lambda path: path in devices)
  assert cpu.libtpu_profiler_on_cpu(environ) is want


@pytest.mark.parametrize("mode, environ, want", [
    ("madvise", {"JAX_PLATFORMS": "cpu"}, "glibc.malloc.hugetlb=1"),
    # Others' tunables are kept.
    ("madvise", {"JAX_PLATFORMS": "cpu",
                 "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    # Set either way already: the user's choice (0 opts out) stands.
    ("madvise", {"JAX_PLATFORMS": "cpu",
                 "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, None),
    ("madvise", {"JAX_PLATFORMS": "tpu"}, None),
    # The kernel gives huge pages to all memory, or to none.
    ("always", {"JAX_PLATFORMS": "cpu"}, None),
    ("never", {"JAX_PLATFORMS": "cpu"}, None),
])
def test_the_environment_asks_for_huge_pages_only_where_it_helps(
    monkeypatch, mode, environ, want):
  monkeypatch.setattr(cpu, "transparent_huge_pages", lambda: mode)
  monkeypatch.setattr(cpu, "_glibc_version", lambda: (2, 36))
  got = cpu.huge_page_environ(environ)
  assert (got and got["GLIBC_TUNABLES"]) == want
  monkeypatch.setattr(cpu, "_glibc_version", lambda: (2, 31))  # No tunable.
  assert cpu.huge_page_environ(environ) is None


def _run(tunables: str | None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  env.pop("GLIBC_TUNABLES", None)
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-c", PROGRAM], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.splitlines()[-1])


def test_a_process_reruns_itself_to_fault_its_temporaries_in_huge_pages():
  """Opted out (the control): every call faults its temporaries in anew,
  at least half their 4 KiB pages. With huge pages (on this machine's
  kernel, if it grants them on request): the process re-ran itself with
  the tunable, as the same process, and each call faults under 15% of
  those pages."""
  off, on = _run("glibc.malloc.hugetlb=0"), _run(None)
  pages = off["temp"] / os.sysconf("SC_PAGE_SIZE")
  assert off["temp"] >= 128 * 2**20, off
  assert off["tunables"] == "glibc.malloc.hugetlb=0"
  assert min(off["faults"]) > 0.5 * pages, off
  if cpu.huge_page_environ({"JAX_PLATFORMS": "cpu"}) is None:
    assert on["tunables"] == "", on  # Nothing to gain here: not re-run.
  else:
    assert on["tunables"] == "glibc.malloc.hugetlb=1" and on["same_pid"], on
    assert max(on["faults"]) < 0.15 * pages, on
