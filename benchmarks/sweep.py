r"""A real sweep: configs/sweeps/mlp_digits.py (TPE over learning rate, weight
decay, width and dropout of the MLP on digits; median pruning), run by
scripts/sweep.py as a user runs it, with a smaller trial budget.

    python benchmarks/sweep.py [--trials=12]

Writes benchmarks/results/sweep.json: the sweep's own results.json (every
trial, its parameters, accuracy or the step it was pruned at; the best
trial; fANOVA importances) and the command. docs/sweeps.md shows the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "sweep"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trials", type=int, default=12)
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = Path(tmp) / "sweep"
    argv = ["scripts/sweep.py", "--config=configs/mlp_digits.py",
            "--sweep=configs/sweeps/mlp_digits.py", f"--workdir={workdir}",
            f"--sweep.budget.trials={args.trials}"]
    common.run([sys.executable, *argv], env=common.simulated_devices())
    results = json.loads((workdir / "results.json").read_text())
  results["sweep_command"] = "python " + " ".join(
      a for a in argv if not a.startswith("--workdir"))
  print(f"wrote {common.write(NAME, results, args.out)}")


def tables(results: dict) -> dict[str, str]:
  names = ["optimizer.learning_rate", "optimizer.weight_decay",
           "model.width", "model.dropout"]
  names = [n for n in names if n in results["trials"][0]]
  best = results["best"]["trial"] if results["best"] else None
  rows = []
  for t in results["trials"]:
    value = (f"{t['value']:.4f}" if t["state"] == "COMPLETE"
             else f"pruned at step {t['last_step']}"
             if t["state"] == "PRUNED" else t["state"].lower())
    params = [f"{t[n]:.2e}" if isinstance(t[n], float) and n.startswith(
        "optimizer") else f"{t[n]:.2f}" if isinstance(t[n], float)
        else t[n] for n in names]
    rows.append([f"**{t['trial']}**" if t["trial"] == best else t["trial"],
                 *params, value])
  trials = common.markdown(["trial", *names, results["metric"]], rows,
                           "r" + "r" * len(names) + "r")
  importance = common.markdown(
      ["parameter", "fANOVA importance"],
      [[k, f"{v:.2f}"] for k, v in results["importances"].items()], "lr")
  return {"trials": trials, "importances": importance}


if __name__ == "__main__":
  main()
