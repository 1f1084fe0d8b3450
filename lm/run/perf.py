"""Step time, tokens/s and model FLOPs utilization (MFU) for every run.

MFU = model FLOPs per step / step time / peak FLOP/s of the devices.

Model FLOPs: the analytic count of the model (transformer.flops_per_token:
6N-style matmul FLOPs plus attention), else XLA's cost analysis of the
lowered train step. Both are logged at start-up for comparison.

Peak FLOP/s per device:
- TPU and GPU: the data sheets' dense peaks below, per compute dtype.
- CPU: measured (a jitted 2048^3 matmul, median of 10) in a subprocess, so its
  buffers do not stay in the trainer's memory. The matmul accumulates in
  float32 (preferred_element_type), as every matmul of the model does: for
  bfloat16 that is XLA:CPU's native BF16 GEMM, about 2x the float32 rate on
  an AVX512-BF16 CPU, where a bf16-output dot would run through float32. It
  is cached in
  ~/.cache/lm/peak_flops.json per CPU model, core count, dtype and jax
  version. Simulated devices (XLA_FLAGS) share that one peak.
`LM_PEAK_TFLOPS` (per chip) overrides any of them.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys

import jax

# Dense TFLOP/s per chip from the vendors' data sheets (no sparsity).
# float32 on GPUs is the TF32 tensor-core rate XLA uses by default.
DATASHEET_TFLOPS = {
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},  # v5e
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},  # v5p reports "TPU v5"
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},  # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918.0, "float32": 918.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0},  # SXM
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0},
}
CACHE = os.path.expanduser("~/.cache/lm/peak_flops.json")

_MEASURE = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp
n, dtype = 2048, sys.argv[1]
a = jax.random.normal(jax.random.key(0), (n, n), dtype)
b = jax.random.normal(jax.random.key(1), (n, n), dtype)
dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
for _ in range(2):
  dot(a, b).block_until_ready()
medians = []
for _ in range(3):
  ts = []
  for _ in range(10):
    t = time.perf_counter(); dot(a, b).block_until_ready()
    ts.append(time.perf_counter() - t)
  medians.append(statistics.median(ts))
print(json.dumps(2 * n**3 / min(medians)))
"""


def _cpu_key(dtype: str) -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), model)
  except OSError:
    pass
  # "acc f32": peaks measured before the matmul accumulated in float32 are
  # not reused.
  return (f"{model}|{os.cpu_count()} cores|{dtype} acc f32|"
          f"jax {jax.__version__}")


def measure_cpu_peak(dtype: str) -> float:
  """FLOP/s of one jitted square matmul on this CPU (all cores): the best
  of three rounds' medians, so that a slow spell of a shared machine does
  not lower the peak (one round once read half of it: an MFU of 143%)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", _MEASURE, dtype], env=env,
                       capture_output=True, text=True, check=True,
                       timeout=120).stdout
  return float(out.strip().splitlines()[-1])


def peak_flops(dtype: str, devices=None, *, remeasure: bool = False
               ) -> tuple[float, str]:
  """(peak FLOP/s of `devices` together in `dtype`, where it comes from).

  Accelerators: per-chip peak x chips (`LM_PEAK_TFLOPS` is per chip). CPU:
  the machine's measured peak, however many simulated devices share it
  (`remeasure`: measure now and update the cache, as the benchmark does).
  """
  devices = devices or jax.devices()
  device = devices[0]
  count = 1 if device.platform == "cpu" else len(devices)
  if os.environ.get("LM_PEAK_TFLOPS"):
    return (float(os.environ["LM_PEAK_TFLOPS"]) * 1e12 * count,
            "LM_PEAK_TFLOPS")
  if device.platform != "cpu":
    for name, peaks in DATASHEET_TFLOPS.items():
      if name.lower() in device.device_kind.lower():
        tflops = peaks.get(dtype, peaks["bfloat16"])
        return tflops * 1e12 * count, f"data sheet ({name}, {dtype})"
    return float("nan"), f"unknown device kind {device.device_kind!r}"
  key = _cpu_key(dtype)
  try:
    with open(CACHE) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    cache = {}
  if key not in cache or remeasure:
    try:
      cache[key] = measure_cpu_peak(dtype)
    except (subprocess.SubprocessError, OSError, ValueError) as e:
      # MFU is a report, not a reason to stop training.
      return float("nan"), f"not measured ({type(e).__name__})"
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    tmp = f"{CACHE}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(cache, f, indent=1)
    os.replace(tmp, CACHE)
  return cache[key], f"measured {dtype} matmul, cached in {CACHE}"


def xla_flops(lowered) -> float:
  """FLOPs XLA's cost analysis counts in a lowered (or compiled) step."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


class Meter:
  """Turns (steps, seconds) into step time, throughput and MFU."""

  def __init__(self, flops_per_step: float, peak: float):
    self.flops_per_step = flops_per_step
    self.peak = peak

  def metrics(self, steps: int, seconds: float) -> dict[str, float]:
    step_s = seconds / max(steps, 1)
    out = {"step_time_s": step_s}
    if math.isfinite(self.peak) and self.peak > 0:
      out["mfu"] = self.flops_per_step / step_s / self.peak
    return out
