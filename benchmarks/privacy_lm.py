r"""DP-SGD for the LM: the tiny preset on Shakespeare, non-private and at
epsilon 1, 3 and 8 (delta 1e-5), for the same steps and batch; the eval
loss, perplexity and bits per byte of the validation windows.

    python benchmarks/privacy_lm.py [--steps=N]

Each run is `python scripts/train.py --config=configs/lm.py:tiny
--workdir=DIR` with the overrides below, on one CPU device, as
benchmarks/privacy.py runs the classifiers (its `train`): the private runs
add `--config.privacy.target_epsilon=E`, calibrating the noise to spend E in
the planned steps with Poisson sampling of the training split's disjoint
256+1-token windows (18,597 of them: docs/privacy.md). The runs are short
and use the preset's optimizer untuned for privacy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import common
from benchmarks.privacy import DELTA, EPSILONS, epsilon_rows

NAME = "privacy_lm"
CONFIG = "configs/lm.py:tiny"
SHARED = ["--config.train.steps=200", "--config.train.batch_size=32",
          "--config.optimizer.warmup_steps=20",
          "--config.train.eval_every=200", "--config.train.log_every=20",
          "--config.train.checkpoint_every=0"]


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir_root", type=Path,
                      default=Path("runs/privacy_lm"))
  common.add_steps_flag(parser)
  common.add_out_flag(parser, NAME)
  flags = parser.parse_args(argv)
  rows = epsilon_rows(CONFIG, SHARED, flags.workdir_root, flags.steps, "loss")
  common.write(NAME, {"delta": DELTA, "config": CONFIG, "runs": rows},
               flags.out, argv=None)


def tables(results: dict) -> dict[str, str]:
  rows = []
  for label in ["non-private", *(f"epsilon {e:g}" for e in EPSILONS)]:
    r = results["runs"][label]
    sigma = r["noise_multiplier"]
    batch = [a.split("=")[1] for a in r["args"]
             if a.startswith("--config.train.batch_size=")]
    e = r["eval"]
    rows.append([label, r["step"], batch[-1] if batch else "-",
                 "-" if sigma is None else f"{sigma:.3f}",
                 f"{e['loss']:.3f}", f"{e['perplexity']:.2f}",
                 f"{e['bits_per_byte']:.3f}",
                 f"{e['epsilon']:.2f}" if "epsilon" in e else "-"])
  return {"table": common.markdown(
      ["training", "steps", "batch (expected)", "noise multiplier",
       "eval loss", "perplexity", "bits per byte",
       f"epsilon spent (delta {results['delta']:g})"], rows, "lrrrrrrr")}


if __name__ == "__main__":
  main(sys.argv[1:])
