r"""Speed against the reference: our train step and ../shared/bench/ref_lm.py
at the reference shapes, in float32 and in bfloat16.

    python benchmarks/speed.py [--steps=22 --rounds=3]

Runs, each as its own process, one after the other:

    python scripts/benchmark.py --config=configs/lm.py:bench --compare_ref \
        --steps=22 --rounds=3 --out=TMP.json
    python scripts/benchmark.py --config=configs/lm.py:bench --compare_ref \
        --steps=22 --rounds=3 --out=TMP.json \
        --config.precision.compute_dtype=bfloat16

then bfloat16 once more with the other CPU path of its matmuls forced
(`--config.precision.cpu_bf16_dots`: "native" bfloat16 GEMMs, fast with
AVX512-BF16 or AMX, or "float32" GEMMs, for CPUs without; the first
bfloat16 run takes what `auto` picks here), so both paths are measured on
any machine; and writes the runs' full records to
benchmarks/results/speed.json (under `runs[NAME]`, NAME one of RUNS). What each run measures (see
scripts/benchmark.py): one device, the bench preset (4 layers, d_model 256,
4 heads, GELU MLP 1024, vocab 256, seq 256, batch 16); each round runs the
reference subprocess, then our step, `steps` + 1 steps each, so both share
the machine's drift; the first 2 steps of every round are warm-up, so each
side's median is over `rounds` x (`steps` - 1) steps; compile is timed on
its own. MFU is against the matmul peak measured in the
same run, with the same analytic FLOPs for both sides. The input pipeline
(the real corpus, no training) is timed alone over 300 batches.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "speed"
# Run name -> (compute dtype, config.precision.cpu_bf16_dots).
RUNS = {"float32": ("float32", "auto"), "bfloat16": ("bfloat16", "auto"),
        "bfloat16, other path": ("bfloat16", "other")}
OURS, REF = "ours", "reference (ref_lm.py)"


def measure(dtype: str, dots: str, steps: int, rounds: int,
            input_batches: int, tmp: Path) -> dict:
  """One scripts/benchmark.py run (its own process): its --out record."""
  if dots == "other":
    from lm import cpu  # noqa: PLC0415
    dots = "float32" if cpu.bf16_dots("auto") == "native" else "native"
  out = tmp / f"{dtype}-{dots}.json"
  common.run([sys.executable, "scripts/benchmark.py",
              "--config=configs/lm.py:bench", "--compare_ref",
              f"--steps={steps}", f"--rounds={rounds}",
              f"--input_batches={input_batches}", f"--out={out}",
              f"--config.precision.compute_dtype={dtype}",
              f"--config.precision.cpu_bf16_dots={dots}"])
  return json.loads(out.read_text())


def _num(x, spec: str, scale: float = 1) -> str:
  """x * scale; null (NaN in scripts/benchmark.py: not measured) reads n/a."""
  return "n/a" if x is None or math.isnan(x) else format(x * scale, spec)


def tables(results: dict) -> dict[str, str]:
  full, summary = [], []
  for name in RUNS:  # The JSON's keys are sorted: not the order shown.
    run = results["runs"].get(name)
    if run is None:
      continue
    rows = run["rows"]
    dtype = name.split(",")[0]
    if run.get("bf16_dots"):  # Which GEMMs the bfloat16 matmuls ran on.
      dtype += f", {run['bf16_dots']} GEMMs"
    for impl in (OURS, REF):
      if impl not in rows:
        continue
      r = rows[impl]
      full.append([
          dtype, impl, _num(r["step_ms_median"], ".2f"),
          _num(r["tokens_per_s"], ",.0f"), _num(r["mfu"], ".1f", 100),
          _num(r["compile_s"], ".2f"), _num(r["xla_peak_mem_mb"], ".1f"),
          _num(r["peak_rss_mb"], ".0f"),
          _num(r["xla_flops_per_step"], ".2f", 1e-9),
          _num(r["analytic_flops_per_step"], ".2f", 1e-9)])
    ours = rows[OURS]
    ratio = (f"{ours['tokens_per_s'] / rows[REF]['tokens_per_s']:.2f}x"
             if REF in rows else "n/a")
    pipe = rows.get("input pipeline")
    summary.append([
        dtype, ratio, _num(ours["compile_s"], ".2f"),
        _num(ours["peak_rss_mb"], ",.0f"),
        _num(run["matmul_peak_gflops"], ",.0f"),
        _num(pipe["tokens_per_s"] if pipe else None, ",.0f"),
        f"{pipe['tokens_per_s'] / ours['tokens_per_s']:,.0f}x" if pipe
        else "n/a"])
  return {
      "table": common.markdown(
          ["compute dtype", "impl", "step time median (ms)", "tokens/s",
           "MFU (%)", "compile (s)", "peak memory XLA (MB)", "peak RSS (MB)",
           "XLA flops/step (G)", "analytic flops/step (G)"],
          full, "llrrrrrrrr"),
      "summary": common.markdown(
          ["compute dtype", "ours / reference tokens/s", "compile, ours (s)",
           "peak RSS, ours (MB)", "matmul peak (GFLOP/s)",
           "input pipeline (tokens/s)", "input pipeline / step's tokens/s"],
          summary, "lrrrrrr"),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=22,
                      help="Steps per round and side, 2 of them warm-up.")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--input_batches", type=int, default=300,
                      help="Batches to time the input pipeline (0: skip).")
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    # Sequential, never concurrent: each run needs the whole machine.
    runs = {name: measure(dtype, dots, args.steps, args.rounds,
                          args.input_batches, Path(tmp))
            for name, (dtype, dots) in RUNS.items()}
  data = {"steps": args.steps, "rounds": args.rounds,
          "input_batches": args.input_batches, "runs": runs}
  path = common.write(NAME, data, args.out)
  print(tables(json.loads(path.read_text()))["table"])
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
