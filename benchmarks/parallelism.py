r"""Short training runs of each parallelism strategy on 8 simulated CPU
devices: losses, throughput and the MoE's dropped assignments.

    python benchmarks/parallelism.py

Each run is `scripts/train.py` in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=8, its workdir under
--workdir (emptied first): 100 steps of configs/lm.py:tiny (batch 32) on
the mesh of its name, with an eval at the last step; `long` is 20 steps of
configs/lm.py:long (8 x 4096 tokens, ring attention over sequence=8). From
each run's metrics.jsonl: the last logged train loss, the eval loss at the
last step, the median tokens/s of the logged train intervals after the
first (which includes the compile), and the MoE's dropped fraction at the
last step. Scanned layers initialize differently (one key split over the
stack), so data8_scanned is the pipeline's one-device-equivalent reference.
A run that fails or does not reach its last step and eval raises.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

from benchmarks import common

NAME = "parallelism"
DEVICES = 8
AXES = ("data", "stage", "fsdp", "expert", "sequence", "tensor")  # Mesh order.
# (name, configs/lm.py preset, flags on top of it).
RUNS = [
    ("data8", "tiny", ["--config.mesh.data=8"]),
    ("fsdp2_tensor2_data2", "tiny", [
        "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2"]),
    ("ring_data2_sequence4", "tiny", [
        "--config.mesh.data=2", "--config.mesh.sequence=4"]),
    ("data8_scanned", "tiny", [
        "--config.mesh.data=8", "--config.model.scan_layers=True"]),
    ("pipeline_data2_stage2_tensor2", "tiny", [
        "--config.mesh.data=2", "--config.mesh.stage=2",
        "--config.mesh.tensor=2", "--config.model.scan_layers=True",
        "--config.train.microbatches=4"]),
    ("moe_data2_expert4", "moe", []),
    ("long_ring_sequence8", "long", ["--config.train.log_every=5"]),
]

def _mesh(config: dict) -> list[list]:
  """[axis, size] of the mesh axes larger than 1, in mesh order, with a -1
  axis filled in (a list: the JSON's dicts are written with sorted keys)."""
  sizes = config["mesh"]
  fixed = math.prod(v for v in sizes.values() if v != -1)
  sizes = {k: DEVICES // fixed if v == -1 else v for k, v in sizes.items()}
  return [[k, sizes[k]] for k in AXES if sizes.get(k, 1) != 1]


def train(name: str, preset: str, extra: list[str], steps: int,
          root: Path) -> dict:
  """One run of scripts/train.py; its figures from metrics.jsonl."""
  workdir = root / name
  shutil.rmtree(workdir, ignore_errors=True)
  # The presets warm up over 50 steps; a shorter run over half of its steps.
  args = [f"--config=configs/lm.py:{preset}", f"--config.train.steps={steps}",
          f"--config.optimizer.warmup_steps={min(50, steps // 2)}",
          f"--config.train.eval_every={steps}",
          "--config.train.checkpoint_every=0", *extra]
  common.run([sys.executable, "scripts/train.py", f"--workdir={workdir}",
              *args],
             env=common.simulated_devices(DEVICES))
  config = json.loads((workdir / "config.json").read_text())
  records = [json.loads(line)
             for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  # A run that stopped early must not become a row.
  if (not train_rows or train_rows[-1]["step"] != steps or not evals
      or evals[-1]["step"] != steps):
    raise RuntimeError(f"{name}: no train and eval record at step {steps} in "
                       f"{workdir / 'metrics.jsonl'}")
  # The first logged interval includes the compile.
  timed = train_rows[1:] or train_rows
  return dict(
      preset=preset, args=args, mesh=_mesh(config),
      steps=train_rows[-1]["step"], train_loss=train_rows[-1]["loss"],
      eval_loss=evals[-1]["loss"],
      tokens_per_sec=[r["tokens_per_sec"] for r in train_rows],
      tokens_per_sec_median=statistics.median(
          r["tokens_per_sec"] for r in timed),
      moe_dropped_fraction=train_rows[-1].get("moe_dropped_fraction"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100,
                      help="steps of the tiny and moe runs")
  parser.add_argument("--long_steps", type=int, default=20,
                      help="steps of the long run")
  parser.add_argument("--only", default="",
                      help="comma-separated runs to make (default all): "
                      + ", ".join(r[0] for r in RUNS))
  parser.add_argument("--workdir", default=str(common.REPO / "runs" / NAME),
                      help="scratch directory of the runs")
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  only = common.parse_only(parser, args.only, [r[0] for r in RUNS])
  runs = {}
  for name, preset, extra in RUNS:
    if only and name not in only:
      continue
    steps = args.long_steps if preset == "long" else args.steps
    runs[name] = train(name, preset, extra, steps, Path(args.workdir))
    print(name, {k: v for k, v in runs[name].items()
                 if k not in ("args", "tokens_per_sec")}, flush=True)
  path = common.write(NAME, dict(runs=runs, devices=DEVICES), args.out)
  print(f"wrote {path}")


def tables(results: dict) -> dict[str, str]:
  rows = []
  for name, r in sorted(results["runs"].items()):
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"]) or "1 device"
    dropped = r["moe_dropped_fraction"]
    rows.append([name, mesh, r["steps"], f"{r['train_loss']:.4f}",
                 f"{r['eval_loss']:.4f}", f"{r['tokens_per_sec_median']:,.0f}",
                 "" if dropped is None else f"{dropped:.3f}"])
  return {"runs": common.markdown(
      ["run", "mesh", "steps", "train loss", "eval loss", "tokens/s (median)",
       "dropped"], rows, "llrrrrr")}


if __name__ == "__main__":
  main()
