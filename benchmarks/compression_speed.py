r"""Step time of each compression mode, on a quiet machine.

    python benchmarks/compression_speed.py [--steps=40]

The tiny LM (configs/lm.py:tiny: batch 32 x 256 tokens, 8 simulated CPU
devices, mesh data=8) trains `--steps` steps per mode with
`scripts/train.py`, one mode at a time, without evals and with one
checkpoint at the end. Recorded: the step time of each train log line
(every 5 steps) after the first, which includes the compilation; the table
shows their median. Not the accuracy runs of benchmarks/compression_modes.py:
those may share the CPU with other work. Run this with nothing else busy.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "compression_speed"
LOG_EVERY = 5
MODES = {
    "float32": [],
    "bfloat16": ["--config.precision.compute_dtype=bfloat16"],
    "float16": ["--config.precision.compute_dtype=float16"],
    "int8": ["--config.quant.mode=int8"],
    "int4_weights": ["--config.quant.mode=int4_weights"],
    "fp8": ["--config.quant.mode=fp8"],
    "int8 + int8 backward": ["--config.quant.mode=int8",
                             "--config.quant.backward=int8"],
    "prune 0.5": ["--config.prune.sparsity=0.5"],
}


def step_times(args: list[str]) -> list[float]:
  """Seconds per step of each train log line after the first."""
  env = common.simulated_devices()
  with tempfile.TemporaryDirectory() as workdir:
    common.run([sys.executable, "scripts/train.py", f"--workdir={workdir}",
                *args], env=env)
    lines = [json.loads(s) for s in
             (Path(workdir) / "metrics.jsonl").read_text().splitlines() if s]
  times = [x["step_time_s"] for x in lines if x["split"] == "train"][1:]
  if not times:
    raise RuntimeError(f"{args}: no train log line after the first; raise "
                       "--steps.")
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=40,
                      help="Steps per mode (a log line every 5).")
  parser.add_argument("--only", default=",".join(MODES),
                      help="Validation only: comma-separated modes to run "
                      "(float32 is the baseline of the table).")
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  only = args.only.split(",")
  if set(only) - set(MODES) or "float32" not in only:
    parser.error(f"--only={args.only}: float32 and any of {list(MODES)}.")
  modes = []
  for mode, overrides in MODES.items():
    if mode not in only:
      continue
    train_args = ["--config=configs/lm.py:tiny",
                  f"--config.train.steps={args.steps}",
                  f"--config.train.log_every={LOG_EVERY}",
                  "--config.train.eval_every=0",
                  "--config.train.checkpoint_every=0",
                  # Timing only: no warmup, so any --steps is a valid run.
                  "--config.optimizer.warmup_steps=0", *overrides]
    modes.append(dict(mode=mode, args=train_args,
                      step_s=step_times(train_args)))
    print(f"{mode}: {1000 * statistics.median(modes[-1]['step_s']):.0f} "
          "ms/step", flush=True)
  print(f"wrote {common.write(NAME, dict(modes=modes), args.out)}")


def tables(results: dict) -> dict[str, str]:
  medians = {m["mode"]: 1000 * statistics.median(m["step_s"])
             for m in results["modes"]}
  base = medians["float32"]
  rows = [[mode, f"{ms:.0f}", f"{ms / base:.2f}x"]
          for mode, ms in medians.items()]
  return {"table": common.markdown(["mode", "step ms (median)", "vs float32"],
                                   rows, "lrr")}


if __name__ == "__main__":
  main()
