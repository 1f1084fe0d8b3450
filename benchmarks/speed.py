r"""Speed against the reference: our train step and ../shared/bench/ref_lm.py
at the reference shapes, in float32 and in bfloat16.

    python benchmarks/speed.py [--steps=22 --rounds=3]

Runs, each as its own process, one after the other:

    python scripts/benchmark.py --config=configs/lm.py:bench --compare_ref \
        --steps=22 --rounds=3 --out=TMP.json
    python scripts/benchmark.py --config=configs/lm.py:bench --compare_ref \
        --steps=22 --rounds=3 --out=TMP.json \
        --config.precision.compute_dtype=bfloat16

and writes both runs' full records to benchmarks/results/speed.json (under
`runs["float32"]` and `runs["bfloat16"]`). What each run measures (see
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
DTYPES = ("float32", "bfloat16")
OURS, REF = "ours", "reference (ref_lm.py)"


def measure(dtype: str, steps: int, rounds: int, input_batches: int,
            tmp: Path) -> dict:
  """One scripts/benchmark.py run (its own process): its --out record."""
  out = tmp / f"{dtype}.json"
  common.run([sys.executable, "scripts/benchmark.py",
              "--config=configs/lm.py:bench", "--compare_ref",
              f"--steps={steps}", f"--rounds={rounds}",
              f"--input_batches={input_batches}", f"--out={out}",
              f"--config.precision.compute_dtype={dtype}"])
  return json.loads(out.read_text())


def _num(x, spec: str, scale: float = 1) -> str:
  """x * scale; null (NaN in scripts/benchmark.py: not measured) reads n/a."""
  return "n/a" if x is None or math.isnan(x) else format(x * scale, spec)


def tables(results: dict) -> dict[str, str]:
  full, summary = [], []
  for dtype in DTYPES:  # The JSON's keys are sorted: bfloat16 first.
    run = results["runs"][dtype]
    rows = run["rows"]
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
    runs = {dtype: measure(dtype, args.steps, args.rounds,
                           args.input_batches, Path(tmp)) for dtype in DTYPES}
  data = {"steps": args.steps, "rounds": args.rounds,
          "input_batches": args.input_batches, "runs": runs}
  path = common.write(NAME, data, args.out)
  print(tables(json.loads(path.read_text()))["table"])
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
