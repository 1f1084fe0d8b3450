"""What this machine's CPU can do, read from /proc/cpuinfo: whether it has
bfloat16 GEMM instructions (AVX512-BF16 or AMX), which decides how a
bfloat16 model's matmuls run on it (config.precision.cpu_bf16_dots); and
whether its C library should ask for huge pages (`use_huge_pages`)."""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys

BF16_GEMM_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def flags() -> frozenset[str]:
  """The CPU's feature flags (empty where /proc/cpuinfo is unreadable)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def has_bf16_gemm() -> bool:
  return any(f in flags() for f in BF16_GEMM_FLAGS)


def bf16_dots(setting: str) -> str:
  """config.precision.cpu_bf16_dots resolved for this CPU: "native" or
  "float32" ("auto": native iff the CPU has BF16 GEMM instructions)."""
  if setting != "auto":
    return setting
  return "native" if has_bf16_gemm() else "float32"


# Python packages of the accelerator backends jax loads when installed
# (jax[cuda12], jax[cuda13], jax[tpu]), and the device files of the
# accelerators they drive: with a plugin but no device (libtpu is a test
# dependency here), jax falls back to the CPU.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
ACCELERATOR_DEVICES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0")
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
# glibc >= 2.35: malloc asks the kernel for transparent huge pages
# (madvise MADV_HUGEPAGE) for what it maps.
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb"


def jax_runs_on_cpu(environ=os.environ) -> bool:
  """Whether jax will compute on the CPU in a process with `environ`,
  judged before it starts a backend: JAX_PLATFORMS names the CPU first,
  or it is unset and there is no accelerator plugin or no accelerator."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not (any(importlib.util.find_spec(p) for p in ACCELERATOR_PLUGINS)
              and any(os.path.exists(d) for d in ACCELERATOR_DEVICES))


def libtpu_profiler_on_cpu(environ=os.environ) -> bool:
  """Whether a `jax.profiler` trace in a process with `environ` would run
  libtpu's profiler beside a CPU computation: libtpu is installed, jax
  probes for a TPU (JAX_PLATFORMS unset, or naming tpu) and so loads it,
  and computes on the CPU. That profiler samples the CPU's performance
  counters from a thread of its own, which polls: on the 2-core development
  machine the traced steps ran ~1.7x slower than the untraced ones, and
  every kernel's time in the trace was inflated."""
  platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",")
               if p.strip()]
  return ((not platforms or "tpu" in platforms)
          and importlib.util.find_spec("libtpu") is not None
          and jax_runs_on_cpu(environ))


def transparent_huge_pages() -> str:
  """The kernel's transparent huge page mode: "always", "madvise" or
  "never" ("" where unknown: not Linux)."""
  try:
    with open(THP_MODE_FILE) as f:
      found = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return ""
  return found.group(1) if found else ""


def _glibc_version() -> tuple[int, ...]:
  """(2, 36) for glibc 2.36; () for another C library."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, OSError, ValueError):
    return ()
  return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else ()


def huge_page_environ(environ=os.environ) -> dict | None:
  """The environment this process should run in for glibc's malloc to ask
  for huge pages, or None if it needs no change. It changes only where
  that helps: jax runs on the CPU, the kernel grants huge pages on request
  ("madvise"; "always" grants them anyway, "never" not at all), glibc is
  2.35 or newer, and GLIBC_TUNABLES does not set the tunable already
  (either way: `glibc.malloc.hugetlb=0` opts out).

  Why: XLA:CPU allocates each execution's temporaries as one block (546 MB
  for benchmarks/peer_torch.py's float32 step) on one of its threads, where
  glibc maps a block that large afresh and unmaps it when freed. Every step
  then page-faults all of it in again, 4 KiB at a time: 141,000 minor
  faults and 0.27 s of kernel time per 0.85 s step on a 2-core AMD EPYC.
  With huge pages, a few hundred (docs/performance.md, performance log).
  """
  if HUGE_PAGE_TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return None
  if (not jax_runs_on_cpu(environ) or transparent_huge_pages() != "madvise"
      or _glibc_version() < (2, 35)):
    return None
  tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
  return {**environ, "GLIBC_TUNABLES": ":".join(
      [*tunables, f"{HUGE_PAGE_TUNABLE}=1"])}


def use_huge_pages() -> None:
  """Re-runs this process (same pid and arguments) in `huge_page_environ`
  when that changes anything: glibc reads its tunables only at start.
  Call it first thing, before the work begins (scripts do, in
  lm/run/cli.py); the processes it starts inherit the setting."""
  environ = huge_page_environ()
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
