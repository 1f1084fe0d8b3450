r"""The ~1B-parameter model's train step on one GPU: step time and MFU.

    python benchmarks/gpu.py [--only=chunked,cudnn,...] [--steps=10 --rounds=2]

Runs scripts/benchmark.py on `configs/lm.py:1b` (batch 16 x 2048 tokens,
bfloat16, random tokens, no input pipeline) once per variant below, each in
a fresh process, and records its median step time, tokens/s and MFU
(analytic model FLOPs, the recomputation of remat not counted, over the
data sheet's dense bfloat16 peak: 989 TFLOP/s for an H100 or H200).
Beside it, the bfloat16 matmul rate this GPU reaches in jax (8192^3, random
data): the practical ceiling.

Every variant starts from the same seed and reads the same random
batches; its last loss is recorded and must be finite (at initialization
on random tokens it sits near ln(vocabulary) for any correct model, so it
checks for NaNs, not equivalence: tests/models/test_perf_options.py and
the parity check below compare the implementations). A variant that fails
(out of memory, say) is recorded with its error's last line and the rest
still run; results are written after each.

Before the timings, each attention implementation's output and gradients on
this GPU are compared with a float32 reference (jax.nn's XLA attention on
the same bfloat16 inputs upcast), at the 1b preset's head shapes:
‖ours − reference‖ / ‖reference‖ must stay within a few of bfloat16's
ulps (PARITY_RTOL), which a wrong mask or head grouping far exceeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "gpu"
OVERRIDES = ["--config.train.batch_size=16", "--input_batches=0"]
# The attention implementation and remat policy (docs/performance.md lists
# both switches).
VARIANTS = {
    # The default: cudnn here (lm/models/attention.py's resolve).
    "auto": ["--config.model.attention_impl=auto"],
    "chunked": ["--config.model.attention_impl=chunked"],
    "cudnn": ["--config.model.attention_impl=cudnn"],
    "xla": ["--config.model.attention_impl=xla"],
    "cudnn_remat_dots": ["--config.model.attention_impl=cudnn",
                         "--config.model.remat=dots"],
    "cudnn_remat_none": ["--config.model.attention_impl=cudnn",
                         "--config.model.remat=none"],
    # Without remat, batch 16 needs more than the H200's memory.
    "cudnn_remat_none_batch8": ["--config.model.attention_impl=cudnn",
                                "--config.model.remat=none",
                                "--config.train.batch_size=8"],
    "cudnn_remat_dots_batch32": ["--config.model.attention_impl=cudnn",
                                 "--config.model.remat=dots",
                                 "--config.train.batch_size=32"],
    "cudnn_remat_dots_no_batch": ["--config.model.attention_impl=cudnn",
                                  "--config.model.remat=dots_no_batch"],
    "cudnn_remat_dots_batch24": ["--config.model.attention_impl=cudnn",
                                 "--config.model.remat=dots",
                                 "--config.train.batch_size=24"],
    # Every GEMM on cuBLAS (XLA otherwise autotunes Triton GEMMs in too).
    "cudnn_remat_dots_cublas": ["--config.model.attention_impl=cudnn",
                                "--config.model.remat=dots"],
}
# Extra XLA_FLAGS per variant.
XLA_FLAGS = {"cudnn_remat_dots_cublas": "--xla_gpu_enable_triton_gemm=false"}

# bfloat16 keeps 8 significant bits: rounding q, k, v, P and the outputs
# gives norm-relative errors of a few 2^-9; 4 ulps leaves room for the
# 2048-long reductions in float32 and stays far below a wrong result's O(1).
PARITY_RTOL = 4 * 2.0**-8

_PARITY = r"""
import json, sys
import jax, jax.numpy as jnp
from lm.models import attention
B, L, H, N, K = 2, 2048, 32, 4, 64  # configs/lm.py:1b's heads.
keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (B, L, H, K), jnp.bfloat16)
k, v = (jax.random.normal(x, (B, L, N, K), jnp.bfloat16) for x in keys[1:3])
g = jax.random.normal(keys[3], (B, L, H, K), jnp.bfloat16)
def vjp(impl, dtype):
  f = lambda q, k, v: attention.attend(q, k, v, causal=True, impl=impl,
                                       chunks=2)
  out, back = jax.vjp(f, *(t.astype(dtype) for t in (q, k, v)))
  return [out, *back(g.astype(dtype))]
ref = vjp("xla", jnp.float32)
res = {}
for impl in sys.argv[1:]:
  got = vjp(impl, jnp.bfloat16)
  res[impl] = {name: float(jnp.linalg.norm(a.astype(jnp.float32) - b)
                           / jnp.linalg.norm(b))
               for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
print(json.dumps(res))
"""

_MATMUL = r"""
import json, statistics, time
import jax, jax.numpy as jnp
n = 8192
a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
dot = jax.jit(lambda a, b: a @ b)
for _ in range(20):  # Also lets the clocks rise from idle.
  dot(a, b).block_until_ready()
ts = []
for _ in range(5):  # 50 back to back: no host round trip between them.
  t = time.perf_counter()
  jax.block_until_ready([dot(a, b) for _ in range(50)])
  ts.append((time.perf_counter() - t) / 50)
print(json.dumps({"tflops": 2 * n**3 / statistics.median(ts) / 1e12}))
"""


def gpu_info() -> dict:
  out = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
       "--format=csv,noheader"], capture_output=True, text=True, check=True)
  name, driver, memory = [s.strip() for s in
                          out.stdout.splitlines()[0].split(",")]
  return {"name": name, "driver": driver, "memory": memory}


def run_variant(config: str, args: list[str], steps: int, rounds: int,
                timeout: float, xla_flags: str = "") -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "bench.json"
    cmd = [sys.executable, "scripts/benchmark.py", f"--config={config}",
           *OVERRIDES, f"--steps={steps}", f"--rounds={rounds}",
           f"--out={out}", *args]
    env = dict(os.environ)
    if xla_flags:
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    try:
      proc = subprocess.run(cmd, cwd=common.REPO, capture_output=True,
                            text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
      return {"error": f"over {timeout:.0f} s"}
    if proc.returncode or not out.exists():
      lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
      errors = [l for l in lines if "rror" in l] or lines  # XLA's, Python's.
      return {"error": errors[-1][:300] if errors else
              f"exit {proc.returncode}", "log_tail": "\n".join(lines[-40:])}
    result = json.loads(out.read_text())
  ours = result["rows"]["ours"]
  return {"args": args, "step_ms": ours["step_ms_median"],
          "step_ms_min": ours["step_ms_min"],
          "tokens_per_s": ours["tokens_per_s"], "mfu": ours["mfu"],
          "compile_s": ours["compile_s"],
          "xla_peak_gib": ours["xla_peak_mem_mb"] / 1024,
          "analytic_flops_per_step": ours["analytic_flops_per_step"],
          "xla_flops_per_step": ours["xla_flops_per_step"],
          "loss_last": ours["loss_last"],
          "peak_tflops": result["matmul_peak_gflops"] / 1e3,
          "device_kind": result["device_kind"]}


def parity() -> dict:
  """{impl: {out/dq/dk/dv: norm-relative error against float32}}."""
  impls = ["auto", "chunked", "xla", "cudnn"]
  return json.loads(common.run([sys.executable, "-c", _PARITY, *impls])
                    .stdout.splitlines()[-1])


def check_parity(res: dict) -> None:
  bad = {f"{i}.{t}": e for i, errs in res.items() for t, e in errs.items()
         if not e <= PARITY_RTOL}
  if bad:
    raise RuntimeError(f"attention on this GPU differs from the float32 "
                       f"reference beyond {PARITY_RTOL:.4f}: {bad}")


def check_losses(runs: dict) -> None:
  bad = {k: r["loss_last"] for k, r in runs.items()
         if "loss_last" in r and not math.isfinite(r["loss_last"])}
  if bad:
    raise RuntimeError(f"non-finite last losses: {bad}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/lm.py:1b")
  parser.add_argument("--only", default="", help="Variants, comma-separated "
                      f"(default all): {', '.join(VARIANTS)}.")
  parser.add_argument("--steps", type=int, default=10,
                      help="Timed steps per round (after 2 warm-up steps).")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--timeout", type=float, default=240,
                      help="Seconds per variant, compile included.")
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  only = common.parse_only(parser, args.only, VARIANTS) or list(VARIANTS)
  data = {"gpu": gpu_info(), "config": args.config, "steps": args.steps,
          "rounds": args.rounds, "runs": {}}
  data["matmul_bf16_tflops"] = json.loads(common.run(
      [sys.executable, "-c", _MATMUL]).stdout.splitlines()[-1])["tflops"]
  print(f"{data['gpu']}: bf16 matmul {data['matmul_bf16_tflops']:.0f} TFLOP/s",
        flush=True)
  data["attention_parity"] = parity()
  print("attention vs float32:", json.dumps(data["attention_parity"]),
        flush=True)
  for name in only:
    run = run_variant(args.config, VARIANTS[name], args.steps, args.rounds,
                      args.timeout, XLA_FLAGS.get(name, ""))
    data["runs"][name] = run
    print(name, json.dumps({k: v for k, v in run.items() if k != "log_tail"}),
          flush=True)
    if "log_tail" in run:
      print(run["log_tail"], flush=True)
    common.write(NAME, data, args.out)  # After each: a cut-off run keeps some.
  # Checked last: a failed check still leaves the timings recorded.
  check_parity(data["attention_parity"])
  check_losses(data["runs"])
  print(tables(json.loads(Path(args.out).read_text()))["table"])


def _setting(args: list[str], key: str, default: str) -> str:
  """The last `--config.KEY=value` in args, else the preset's `default`."""
  values = [a.split("=", 1)[1] for a in args
            if a.startswith(f"--config.{key}=")]
  return values[-1] if values else default


def _failure(error: str) -> str:
  oom = re.search(r"Out of memory while trying to allocate ([\d.]+)GiB",
                  error)
  return (f"out of memory (a {oom[1]} GiB allocation)" if oom
          else error[:120])


def tables(results: dict) -> dict[str, str]:
  rows = []
  ceiling = results["matmul_bf16_tflops"]
  for name, r in sorted(results["runs"].items(),
                        key=lambda kv: -kv[1].get("mfu", -1)):
    args = r.get("args", VARIANTS.get(name, []))
    setting = [_setting(args, "model.attention_impl", "auto"),
               _setting(args, "model.remat", "full"),
               _setting(args, "train.batch_size", "16"),
               "cuBLAS only" if name in XLA_FLAGS else "XLA's choice"]
    if "error" in r:
      rows.append([*setting, _failure(r["error"]), "", "", "", "", ""])
      continue
    tflops = r["analytic_flops_per_step"] / (r["step_ms"] / 1e3) / 1e12
    rows.append([*setting, f"{r['step_ms']:.0f}", f"{r['tokens_per_s']:,.0f}",
                 f"{100 * r['mfu']:.1f}", f"{100 * tflops / ceiling:.1f}",
                 f"{r['compile_s']:.0f}", f"{r['xla_peak_gib']:.1f}"])
  gpu, m = results["gpu"], results["machine"]
  head = (f"One {gpu['name']} ({gpu['memory']}, driver {gpu['driver']}), "
          f"the machine's own jax {m.get('jax')} and flax {m.get('flax')}; "
          f"a bfloat16 8192^3 matmul ran at {ceiling:.0f} TFLOP/s there. "
          f"{results['rounds']} rounds x {results['steps']} steps per "
          f"variant, medians.\n\n")
  parity = [[impl, *(f"{100 * errs[t]:.2f}" for t in ("out", "dq", "dk",
                                                         "dv"))]
            for impl, errs in results["attention_parity"].items()]
  return {"parity": common.markdown(
      ["attention (bfloat16)", "output (%)", "dq (%)", "dk (%)", "dv (%)"],
      parity, "lrrrr") + f"\n\nThe bound (PARITY_RTOL): "
      f"{100 * PARITY_RTOL:.2f}%.",
      "table": head + common.markdown(
      ["attention", "remat", "batch (x 2048 tokens)", "GEMMs", "step (ms)",
       "tokens/s", "MFU (% of 989 TFLOP/s)", "% of the measured matmul",
       "compile (s)", "XLA peak memory (GiB)"], rows, "llrlrrrrrr")}


if __name__ == "__main__":
  main()
