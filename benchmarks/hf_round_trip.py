r"""Our model -> Hugging Face -> our model, end to end, with the docs' commands.

    python benchmarks/hf_round_trip.py [--steps=N]

1. trains the tiny Shakespeare model (configs/lm.py:tiny, one CPU device),
2. exports it (scripts/export_hf.py) as a LlamaForCausalLM folder,
3. compares it in transformers (scripts/compare_hf.py): logits on random
   tokens and 200 greedy tokens after "ROMEO." with the exported tokenizer,
4. imports the folder back (scripts/import_hf.py) and checks every
   parameter is bit-identical to the trained run's,
5. evaluates both runs on the test split (scripts/eval.py),
6. fine-tunes the imported run for 100 more steps (config.train.init_from).
--steps shortens step 1 (a check of the script, not the published figure).
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "hf_round_trip"
PROMPT = "ROMEO."
EVALS = ("trained", "imported back", "imported, +100 steps")  # In order.


def _py(*args: str) -> str:
  return common.run([sys.executable, *args]).stdout


def _eval(workdir: Path) -> dict:
  out = _py("scripts/eval.py", f"--workdir={workdir}", "--split=test")
  return {k: float(v) for k, v in re.findall(
      r"(loss|perplexity|bits_per_byte) ([\d.]+)", out)}


def _params_equal(a: Path, b: Path) -> bool:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from lm.run import restore  # noqa: PLC0415
  x, y = (jax.device_get(restore.load(w, "1,1,1").params) for w in (a, b))
  return all(np.array_equal(p, q) and p.dtype == q.dtype
             for p, q in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def measure(tmp: Path, steps: int) -> dict:
  tiny, hf, back, ft = (tmp / n for n in ("tiny", "tiny_hf", "back", "ft"))
  extra = common.few_steps(steps) if steps else []
  _py("scripts/train.py", "--config=configs/lm.py:tiny", f"--workdir={tiny}",
      *extra)
  export = _py("scripts/export_hf.py", f"--workdir={tiny}", f"--out={hf}")
  compare = _py("scripts/compare_hf.py", f"--workdir={tiny}",
                f"--hf_dir={hf}", "--lengths=1,64,256",
                f"--prompt={PROMPT}", "--max_new_tokens=200")
  rows = [{"length": int(m[0]), "max_abs_diff": float(m[1]),
           "kl_per_token": float(m[2]), "argmax_agreement": float(m[3])}
          for m in re.findall(r"length +(\d+): max \|logit diff\| (\S+), "
                              r"KL/token (\S+), greedy agreement (\S+)",
                              compare)]
  identical = "greedy tokens identical: True" in compare
  text = re.search(r"^transformers: (.*)$", compare, re.M)[1]
  _py("scripts/import_hf.py", f"--hf_dir={hf}", f"--workdir={back}")
  evals = {"trained": _eval(tiny), "imported back": _eval(back)}
  _py("scripts/train.py", f"--config=configs/run.py:{back}",
      f"--workdir={ft}", f"--config.train.init_from={back}",
      "--config.train.steps=100", "--config.train.eval_every=100",
      "--config.optimizer.learning_rate=3e-4")
  evals["imported, +100 steps"] = _eval(ft)
  return {"export": export.strip().splitlines()[-1], "logits": rows,
          "greedy_identical": identical, "greedy_text": text,
          "round_trip_bit_identical": _params_equal(tiny, back),
          "evals": evals, "steps": steps or 400}


def tables(results: dict) -> dict[str, str]:
  logits = common.markdown(
      ["tokens", "max abs logit difference", "KL per token",
       "greedy agreement"],
      [[r["length"], f"{r['max_abs_diff']:.2e}", f"{r['kl_per_token']:.1e}",
        f"{r['argmax_agreement']:.3f}"] for r in results["logits"]], "rrrr")
  checks = common.markdown(
      ["check", "result"],
      [["200 greedy tokens after \"ROMEO.\": ours == transformers'",
        "yes" if results["greedy_identical"] else "NO"],
       ["trained -> export -> import: every parameter bit-identical",
        "yes" if results["round_trip_bit_identical"] else "NO"]]
      + [[f"test split, {name}", f"loss {e['loss']:.4f}, "
          f"{e['bits_per_byte']:.4f} bits/byte"]
         for name, e in sorted(results["evals"].items(),
                               key=lambda kv: EVALS.index(kv[0]))])
  return {"logits": logits, "checks": checks}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_out_flag(parser, NAME)
  common.add_steps_flag(parser)
  args = parser.parse_args(argv[1:])
  with tempfile.TemporaryDirectory() as tmp:
    data = measure(Path(tmp), args.steps)
  common.write(NAME, data, args.out, argv)
  for table in tables(data).values():
    print(table + "\n")


if __name__ == "__main__":
  main(sys.argv)
