"""What this machine's CPU can do, read from /proc/cpuinfo: whether it has
bfloat16 GEMM instructions (AVX512-BF16 or AMX), which decides how a
bfloat16 model's matmuls run on it (config.precision.cpu_bf16_dots)."""
from __future__ import annotations

import functools

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
