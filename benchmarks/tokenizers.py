r"""The tiny Shakespeare model with a 2,048-piece BPE against bytes, at the
same training FLOPs.

    python benchmarks/tokenizers.py [--steps=N]

Trains a byte-level BPE of 2,048 pieces on the train split
(scripts/train_tokenizer.py), then configs/lm.py:tiny (one CPU device) with
the byte tokenizer for its 400 steps and with the BPE for as many steps as
the same analytic training FLOPs buy (the BPE's larger embedding and
output layer cost more per token; same batch, same 256-token windows, so a
BPE window holds more text). Reports validation bits per byte (the loss
per UTF-8 byte of text, comparable across tokenizers) from the runs' last
eval, which reads the first 8 batches of the validation split (half of its
text with bytes, all of it with the BPE), and of the final model on the
whole split (scripts/eval.py: the same text for both). --steps shortens
the byte run (a check of the script).
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "tokenizers"
VOCAB = 2048


def _flops_per_step(vocab: int) -> float:
  from configs import lm  # noqa: PLC0415
  from lm import models  # noqa: PLC0415
  from lm.models import transformer  # noqa: PLC0415
  config = lm.get_config("tiny")
  config.model.vocab_size = vocab
  from lm import config as config_lib  # noqa: PLC0415
  cfg = models.model_config(config_lib.resolve(config))
  tokens = config.train.batch_size * cfg.max_len
  return transformer.flops_per_token(cfg, cfg.max_len) * tokens


def _train(workdir: Path, steps: int, *extra: str) -> dict:
  out = common.run([sys.executable, "scripts/train.py",
                    "--config=configs/lm.py:tiny", f"--workdir={workdir}",
                    f"--config.train.steps={steps}",
                    f"--config.train.eval_every={steps}",
                    # The preset's 50 (a short --steps check: fewer).
                    f"--config.optimizer.warmup_steps={min(50, steps)}",
                    *extra]).stdout
  final = re.search(r"final eval: (.*)$", out, re.M)[1]
  whole = common.eval_whole_validation(workdir)
  return {**{k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", final)},
          "whole_split_bits_per_byte": whole["bits_per_byte"]}


def measure(tmp: Path, steps: int) -> dict:
  out = common.run([sys.executable, "scripts/train_tokenizer.py",
                    "--config=configs/lm.py:tiny", f"--vocab_size={VOCAB}",
                    f"--out={tmp / 'bpe'}"]).stdout
  byte_flops, bpe_flops = _flops_per_step(256), _flops_per_step(VOCAB)
  bpe_steps = round(steps * byte_flops / bpe_flops)
  rows = [{"tokenizer": "byte", "vocab": 256, "steps": steps,
           "flops": steps * byte_flops,
           **_train(tmp / "byte", steps)},
          {"tokenizer": f"BPE {VOCAB}", "vocab": VOCAB, "steps": bpe_steps,
           "flops": bpe_steps * bpe_flops,
           **_train(tmp / "bpe_run", bpe_steps,
                    f"--config.data.tokenizer={tmp / 'bpe' / 'tokenizer.json'}",
                    f"--config.model.vocab_size={VOCAB}")}]
  return {"train_tokenizer": out.strip().splitlines(), "runs": rows}


def tables(results: dict) -> dict[str, str]:
  return {"bits_per_byte": common.markdown(
      ["tokenizer", "vocabulary", "steps", "training FLOPs",
       "validation loss per token", "validation bits per byte",
       "the same, whole validation split"],
      [[r["tokenizer"], r["vocab"], r["steps"], f"{r['flops']:.3g}",
        f"{r['loss']:.3f}", f"{r['bits_per_byte']:.3f}",
        f"{r['whole_split_bits_per_byte']:.3f}"]
       for r in results["runs"]], "lrrrrrr")}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_out_flag(parser, NAME)
  common.add_steps_flag(parser)
  args = parser.parse_args(argv[1:])
  with tempfile.TemporaryDirectory() as tmp:
    data = measure(Path(tmp), args.steps or 400)
  common.write(NAME, data, args.out, argv)
  print(tables(data)["bits_per_byte"])


if __name__ == "__main__":
  main(sys.argv)
