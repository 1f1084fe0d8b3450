r"""Step time, compile time and XLA memory of each performance option at the
reference shapes (configs/lm.py:bench, one CPU device).

    python benchmarks/perf_options.py [--steps=14 --rounds=2] [--only=a,b]

One `scripts/benchmark.py` run per option, each its own process, one after
the other:

    python scripts/benchmark.py --config=configs/lm.py:bench --steps=14 \
        --rounds=2 --input_batches=0 --out=TMP.json OVERRIDES...

Each run: 2 rounds of 14 + 1 steps, the first 2 of each round warm-up, so
the step time is the median of 2 x 13 steps; compile timed on its own. The
float32 rows are compared with "default", the bfloat16 rows with "bf16".
Separate runs differ by up to ~5% on a shared machine;
benchmarks/interleaved.py compares variants within one process, more
closely. Writes every run's full record to
benchmarks/results/perf_options.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "perf_options"
BF16 = "--config.precision.compute_dtype=bfloat16"
# name -> overrides of configs/lm.py:bench, in the table's order.
OPTIONS = {
    "default": [],
    "plain_autodiff": ["--config.model.einsum_grad=autodiff"],
    "attention_xla": ["--config.model.attention_impl=xla"],
    "attention_chunks_1": ["--config.model.attention_chunks=1"],
    "attention_chunks_4": ["--config.model.attention_chunks=4"],
    "fused_qkv": ["--config.model.fused_qkv=True"],
    "scan": ["--config.model.scan_layers=True"],
    "remat_full": ["--config.model.remat=full"],
    "remat_dots": ["--config.model.remat=dots"],
    "remat_dots_no_batch": ["--config.model.remat=dots_no_batch"],
    "bf16": [BF16],
    "bf16_autodiff": [BF16, "--config.model.einsum_grad=autodiff"],
    "bf16_attention_xla": [BF16, "--config.model.attention_impl=xla"],
}


def baseline(name: str) -> str:
  return "bf16" if name.startswith("bf16") else "default"


def measure(name: str, steps: int, rounds: int, tmp: Path) -> dict:
  """One scripts/benchmark.py run (its own process): its --out record."""
  out = tmp / f"{name}.json"
  common.run([sys.executable, "scripts/benchmark.py",
              "--config=configs/lm.py:bench", f"--steps={steps}",
              f"--rounds={rounds}", "--input_batches=0", f"--out={out}",
              *OPTIONS[name]])
  return json.loads(out.read_text())


def tables(results: dict) -> dict[str, str]:
  ours = {o["name"]: o["run"]["rows"]["ours"] for o in results["options"]}
  rows = []
  for o in results["options"]:
    r, base = ours[o["name"]], ours.get(baseline(o["name"]))
    rows.append([
        o["name"], f"{r['step_ms_median']:.0f}",
        f"{base['step_ms_median'] / r['step_ms_median']:.2f}x" if base
        else "n/a",
        f"{100 * r['mfu']:.1f}", f"{r['compile_s']:.2f}",
        # null: the platform gave XLA no memory analysis.
        "n/a" if r["xla_peak_mem_mb"] is None
        else f"{r['xla_peak_mem_mb']:.0f}"])
  return {"table": common.markdown(
      ["option (overrides of configs/lm.py:bench)", "step time median (ms)",
       "vs default", "MFU (%)", "compile (s)", "peak memory XLA (MB)"],
      rows, "lrrrrr")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=14,
                      help="Steps per round, 2 of them warm-up.")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--only", default="",
                      help="Comma-separated options to run (default: all).")
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  names = [n for n in args.only.split(",") if n] or list(OPTIONS)
  unknown = sorted(set(names) - set(OPTIONS))
  if unknown:
    parser.error(f"unknown options {unknown}; known: {list(OPTIONS)}")
  options = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in OPTIONS:  # The table's order, whatever --only's.
      if name in names:
        options.append({"name": name, "overrides": OPTIONS[name],
                        "run": measure(name, args.steps, args.rounds,
                                       Path(tmp))})
        print(f"{name} done", flush=True)
  data = {"steps": args.steps, "rounds": args.rounds, "options": options}
  path = common.write(NAME, data, args.out)
  print(tables(json.loads(path.read_text()))["table"])
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
