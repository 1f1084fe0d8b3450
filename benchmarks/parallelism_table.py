"""Prints the README's "Parallelism strategies" table from the runs of
benchmarks/parallelism.sh (default directory runs/parallelism)."""
import json
import math
import statistics
import sys
from pathlib import Path


DEVICES = 8  # benchmarks/parallelism.sh simulates 8 CPU devices.


def _rows(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def main(root: str = "runs/parallelism") -> None:
  print("| run | mesh | steps | train loss | eval loss | tokens/s "
        "(median) | dropped |")
  print("|---|---|---|---|---|---|---|")
  for run in sorted(Path(root).iterdir()):
    if not (run / "metrics.jsonl").exists():
      continue
    config = json.loads((run / "config.json").read_text())
    sizes = config["mesh"]
    fixed = math.prod(v for v in sizes.values() if v != -1)
    sizes = {k: DEVICES // fixed if v == -1 else v for k, v in sizes.items()}
    mesh = " x ".join(f"{k}={v}" for k, v in sizes.items()
                      if v != 1) or "1 device"
    rows = _rows(run / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    # The first logged interval includes the compile.
    speed = statistics.median(r["tokens_per_sec"] for r in train[1:]
                              or train)
    dropped = train[-1].get("moe_dropped_fraction")
    print(f"| {run.name} | {mesh} | {train[-1]['step']} | "
          f"{train[-1]['loss']:.4f} | "
          f"{evals[-1]['loss']:.4f} | {speed:,.0f} | "
          f"{'' if dropped is None else f'{dropped:.3f}'} |")


if __name__ == "__main__":
  main(*sys.argv[1:])
