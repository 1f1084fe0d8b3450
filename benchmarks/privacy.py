r"""DP-SGD: test accuracy of the MLP on digits and MNIST-5k, non-private
and at epsilon 1, 3 and 8 (delta 1e-5), for the same steps and batch.

    python benchmarks/privacy.py [--steps=N]

Each run is `python scripts/train.py --config=CONFIG --workdir=DIR` with
the overrides below, on one CPU device, in a fresh directory under
--workdir_root; the private runs add `--config.privacy.target_epsilon=E`,
so their noise multiplier is calibrated (RDP accountant, Poisson sampling
at rate batch_size / training examples) to spend exactly E in the planned
steps. Recorded: the final eval line of DIR/metrics.jsonl (the whole test
split; `epsilon` is what the run spent), the noise multiplier the run
logged, and the process's wall time (in the JSON only: on a machine
shared with other jobs it measures them too).

The runs are shorter than the presets' (the per-example gradients of a
padded Poisson batch cost several times an ordinary step on this CPU) and
use the presets' optimizer untuned for privacy; MNIST trains without
augmentation (the same for every row).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

from benchmarks import common

NAME = "privacy"
DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)
# Dataset -> (config, overrides shared by its private and non-private runs).
RUNS = {
    "digits": ("configs/mlp_digits.py", [
        "--config.train.steps=300", "--config.train.batch_size=128",
        "--config.optimizer.warmup_steps=20",
        "--config.train.eval_every=300", "--config.train.log_every=50",
        "--config.train.checkpoint_every=0"]),
    "MNIST-5k": ("configs/mlp_mnist.py", [
        "--config.train.steps=150", "--config.train.batch_size=64",
        "--config.optimizer.warmup_steps=10", "--config.data.augment=False",
        "--config.train.eval_every=150", "--config.train.log_every=50",
        "--config.train.checkpoint_every=0"]),
}


def train(config: str, args: list[str], workdir: Path) -> dict:
  """One run in a fresh `workdir`: its final eval line, the noise
  multiplier it logged (private runs) and its wall time."""
  if workdir.exists():
    shutil.rmtree(workdir)
  start = time.perf_counter()
  out = common.run([sys.executable, "scripts/train.py", f"--config={config}",
                    f"--workdir={workdir}", *args])
  wall = time.perf_counter() - start
  lines = [json.loads(s) for s in
           (workdir / "metrics.jsonl").read_text().splitlines() if s]
  evals = [x for x in lines if x["split"] == "eval"]
  if not evals:
    raise RuntimeError(f"{config} {args}: no eval line in {workdir}")
  found = re.search(r"DP-SGD: noise multiplier ([0-9.]+)",
                    out.stdout + out.stderr)
  return dict(config=config, args=args, wall_s=wall, step=evals[-1]["step"],
              noise_multiplier=float(found.group(1)) if found else None,
              eval={k: v for k, v in evals[-1].items()
                    if k not in ("step", "split")})


def epsilon_rows(config: str, shared: list[str], workdir_root: Path,
                 steps: int | None, metric: str) -> dict:
  """The non-private run and one per epsilon of EPSILONS (noise calibrated
  for the planned steps), each with the `shared` overrides; `steps`: a
  check of the script only (a few steps, no measurement)."""
  if steps:
    shared = [a for a in shared if "steps=" not in a and "every=" not in a]
    shared += common.few_steps(steps)
  rows = {}
  for eps in (None, *EPSILONS):
    label = "non-private" if eps is None else f"epsilon {eps:g}"
    args = list(shared)
    if eps is not None:
      args += [f"--config.privacy.target_epsilon={eps}",
               f"--config.privacy.delta={DELTA}"]
    rows[label] = train(config, args, workdir_root / label.replace(" ", "_"))
    print(workdir_root.name, label, rows[label]["eval"][metric],
          f"{rows[label]['wall_s']:.0f} s", flush=True)
  return rows


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir_root", type=Path, default=Path("runs/privacy"))
  common.add_steps_flag(parser)
  common.add_out_flag(parser, NAME)
  flags = parser.parse_args(argv)
  results = {dataset: epsilon_rows(config, shared,
                                   flags.workdir_root / dataset, flags.steps,
                                   "accuracy")
             for dataset, (config, shared) in RUNS.items()}
  common.write(NAME, {"delta": DELTA, "runs": results}, flags.out, argv=None)


def tables(results: dict) -> dict[str, str]:
  rows = []
  order = ["non-private", *(f"epsilon {e:g}" for e in EPSILONS)]
  for dataset in RUNS:
    runs = results["runs"][dataset]
    for label in order:
      r = runs[label]
      sigma = r["noise_multiplier"]
      batch = [a.split("=")[1] for a in r["args"]
               if a.startswith("--config.train.batch_size=")]
      rows.append([dataset, label, r["step"], batch[-1] if batch else "-",
                   "-" if sigma is None else f"{sigma:.3f}",
                   f"{r['eval']['accuracy']:.3f}",
                   f"{r['eval']['epsilon']:.2f}" if "epsilon" in r["eval"]
                   else "-"])
  return {"table": common.markdown(
      ["dataset", "training", "steps", "batch (expected)", "noise multiplier",
       "test accuracy", f"epsilon spent (delta {results['delta']:g})"],
      rows, "llrrrrr")}


if __name__ == "__main__":
  main(sys.argv[1:])
