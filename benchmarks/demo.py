r"""What `make demo` trains: the tiny LM on Shakespeare with a 1,024-piece BPE,
its validation curve and throughput.

    python benchmarks/demo.py [--workdir=runs/demo_benchmark]

The Makefile's two commands: scripts/train_tokenizer.py trains a 1,024-piece
byte-level BPE on the train split, then scripts/train.py trains
configs/lm.py:demo with it (1,850 steps of batch 8 x 256 tokens, an eval of
32 fixed validation batches every 500 steps, on 8 simulated CPU devices as
data=2 x fsdp=2 x tensor=2) in a fresh --workdir. Recorded: every eval line
of metrics.jsonl (validation loss and perplexity per token, bits per byte),
the tokens/s of the train log lines (every 20 steps) after the first, which
includes the compilation (the table shows their median), the parameter
count, and the wall time of the two processes (with the data already
prepared).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks import common

NAME = "demo"
# As the Makefile's demo target runs scripts/train.py (with the tokenizer).
ARGS = ["--config=configs/lm.py:demo"]
BPE_VOCAB = 1024


def train_tokenizer(out: Path, vocab: int = BPE_VOCAB) -> list[str]:
  """Trains the Makefile's byte-level BPE into `out` (as `make demo` does);
  returns the scripts/train.py overrides that train with it."""
  common.run([sys.executable, "scripts/train_tokenizer.py", *ARGS,
              f"--out={out}", f"--vocab_size={vocab}", "--overwrite"],
             env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return [f"--config.data.tokenizer={out / 'tokenizer.json'}",
          f"--config.model.vocab_size={vocab}"]


def num_params(workdir: Path) -> int:
  """The model's parameter count, from the run's config."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from lm import config as config_lib, models  # noqa: PLC0415
  config = config_lib.resolve(json.loads((workdir / "config.json")
                                         .read_text()))
  model = models.abstract_model(models.model_config(config),
                                config.model.name)
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/demo_benchmark",
                      help="Scratch run directory (deleted first).")
  common.add_steps_flag(parser)
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  workdir = Path(args.workdir).absolute()
  if workdir.exists():
    shutil.rmtree(workdir)
  train_args = list(ARGS)
  if args.steps:
    n = args.steps
    train_args += [*common.few_steps(n, evals=2),
                   f"--config.train.log_every={max(n // 4, 1)}"]
  start = time.perf_counter()
  tokenizer = train_tokenizer(workdir.parent / f"{workdir.name}_tokenizer")
  env = common.simulated_devices()
  common.run([sys.executable, "scripts/train.py", f"--workdir={workdir}",
              *train_args, *tokenizer], env=env)
  wall = time.perf_counter() - start

  lines = [json.loads(s) for s in
           (workdir / "metrics.jsonl").read_text().splitlines() if s]
  evals = [{k: x[k] for k in ("step", "loss", "perplexity", "bits_per_byte")}
           for x in lines if x["split"] == "eval"]
  total = json.loads((workdir / "config.json").read_text())["train"]["steps"]
  rates = [x["tokens_per_sec"] for x in lines if x["split"] == "train"][1:]
  if not evals or evals[-1]["step"] != total or not rates:
    raise RuntimeError(f"{workdir}/metrics.jsonl lacks the eval at step "
                       f"{total} or train lines after the first.")
  data = dict(args=train_args, bpe_vocab=BPE_VOCAB, wall_s=wall,
              params=num_params(workdir), evals=evals, tokens_per_sec=rates)
  print(f"wrote {common.write(NAME, data, args.out)}")


def tables(results: dict) -> dict[str, str]:
  curve = common.markdown(
      ["step", "validation loss (per token)", "perplexity (per token)",
       "bits per byte"],
      [[e["step"], f"{e['loss']:.3f}", f"{e['perplexity']:.2f}",
        f"{e['bits_per_byte']:.3f}"] for e in results["evals"]], "rrrr")
  minutes, seconds = divmod(round(results["wall_s"]), 60)
  throughput = common.markdown(
      ["parameters", "tokens/s (median; BPE tokens)",
       "wall time (tokenizer and training)"],
      [[f"{results['params']:,}",
        f"{statistics.median(results['tokens_per_sec']):,.0f}",
        f"{minutes}m{seconds:02d}s"]], "rrr")
  return {"curve": curve, "throughput": throughput}


if __name__ == "__main__":
  main()
