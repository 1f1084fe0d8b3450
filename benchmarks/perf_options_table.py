"""The README table of benchmarks/perf_options.sh's runs."""
import json
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "runs/perf_options"
bases = {}  # float32 rows against "default", bfloat16 rows against "bf16".
print("| option (overrides of configs/lm.py:bench) | step time median (ms) | "
      "vs default | MFU (%) | compile (s) | peak memory XLA (MB) |")
print("|---|---:|---:|---:|---:|---:|")
for name in ("default", "plain_autodiff", "attention_xla",
             "attention_chunks_1", "attention_chunks_4", "fused_qkv", "scan",
             "remat_full", "remat_dots", "remat_dots_no_batch", "bf16",
             "bf16_autodiff", "bf16_attention_xla"):
  path = os.path.join(out, f"{name}.json")
  if not os.path.exists(path):
    continue
  with open(path) as f:
    r = json.load(f)["rows"]["ours"]
  base = bases.setdefault(name.startswith("bf16"), r["step_ms_median"])
  print(f"| {name} | {r['step_ms_median']:.0f} | "
        f"{base / r['step_ms_median']:.2f}x | {100 * r['mfu']:.1f} | "
        f"{r['compile_s']:.2f} | {r['xla_peak_mem_mb']:.0f} |")
