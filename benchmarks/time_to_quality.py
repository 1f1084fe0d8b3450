r"""Time to quality: validation bits per byte against wall-clock seconds, for
`make demo`'s recipe and the ones it came from, on the demo's mesh (8
simulated CPU devices as data=2 x fsdp=2 x tensor=2) and held-out plays.

    python benchmarks/time_to_quality.py [--only=tiny,fast,demo] [--seeds=3]

Each recipe trains once per seed (`--config.seed`: the initial weights and
the data order; seed 0 is the command as the docs give it). One seed's
final figure moves by about 0.01 with anything that changes the rounding,
which is more than the goal's margin, so the table reports the median over
seeds, their range, and how many seeds met the goal.

--only re-measures those recipes and keeps the others' runs from the
results file when it was measured on the same CPU.

Each recipe is scripts/train.py in a fresh run directory; the clock starts
when the process is launched (a BPE recipe's: when its tokenizer's training
is), so it counts start-up, compilation and the evals, not only the steps;
each eval's time is when its line reaches our pipe. The in-training evals
read the first 256 windows of the validation split (or all of it, if it
has fewer); bits per byte are comparable across tokenizers, but a BPE
window holds more text, so the final model of every run is also evaluated
on the whole split (scripts/eval.py), outside the clock. Writes
benchmarks/results/time_to_quality.json and the curve, time_to_quality.png
next to it. Run on a quiet machine: the figures are wall-clock.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from benchmarks import common, demo

NAME = "time_to_quality"
GOAL_BPB = 2.2
GOAL_S = 300


class Recipe(NamedTuple):
  what: str
  args: list[str]  # scripts/train.py's, besides --workdir.
  bpe_vocab: int = 0  # > 0: a byte-level BPE of this many pieces.


TINY = ["--config=configs/lm.py:tiny", "--config.mesh.data=2",
        "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
RECIPES = {
    "tiny": Recipe("configs/lm.py:tiny as it is (float32, batch 32, 400 "
                   "steps; `make demo`'s recipe until 2026-11-30)", TINY),
    "fast": Recipe("configs/lm.py:demo with bytes as tokens: bfloat16 "
                   "compute, batch 8, 1,850 steps, peak learning rate 3e-3 "
                   "decayed to 0, weight decay 0.2, 4 key/value heads, a "
                   "checkpoint at the end only", demo.ARGS),
    "demo": Recipe(f"`make demo`: `fast` with a {demo.BPE_VOCAB:,}-piece "
                   "byte-level BPE trained on the train split "
                   "(scripts/train_tokenizer.py, inside the clock)",
                   demo.ARGS, demo.BPE_VOCAB),
}
EVAL_LINE = re.compile(r"step\s+(\d+)/\d+ \| eval \|")


def train(recipe: Recipe, seed: int, tmp: Path) -> dict:
  """Trains one recipe with one seed in `tmp`: every eval of its
  metrics.jsonl with `seconds`, the wall-clock from launch to that eval's
  line on stdout (a BPE recipe's clock starts with its tokenizer's
  training), and the final model's bits per byte on the whole validation
  split (`scripts/eval.py`: every whole batch of it)."""
  workdir = tmp / "run"
  start = time.monotonic()
  tokenizer = (demo.train_tokenizer(tmp / "tokenizer", recipe.bpe_vocab)
               if recipe.bpe_vocab else [])
  cmd = [sys.executable, "-u", "scripts/train.py", f"--workdir={workdir}",
         *recipe.args, *tokenizer, f"--config.seed={seed}"]
  env = dict(common.simulated_devices(), PYTHONUNBUFFERED="1")
  seconds = {}
  with subprocess.Popen(cmd, cwd=common.REPO, env=env, text=True,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT) as proc:
    tail = []
    for line in proc.stdout:
      tail = (tail + [line])[-40:]
      if match := EVAL_LINE.search(line):
        seconds[int(match.group(1))] = time.monotonic() - start
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                       + "".join(tail))
  evals = [json.loads(s) for s in
           (workdir / "metrics.jsonl").read_text().splitlines() if s]
  return {"evals": [{"step": e["step"], "seconds": seconds[e["step"]],
                     "bits_per_byte": e["bits_per_byte"]}
                    for e in evals if e["split"] == "eval"],
          "validation": common.eval_whole_validation(workdir, env)}


def _in_order(runs: dict) -> list[tuple[str, dict]]:
  """The runs in RECIPES' order (the results file sorts its keys)."""
  return [(name, runs[name]) for name in RECIPES if name in runs]


def plot(results: dict, path: Path) -> None:
  import matplotlib  # noqa: PLC0415  (slow: not at import)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for i, (name, run) in enumerate(_in_order(results["runs"])):
    for j, seed in enumerate(run["seeds"]):
      ax.plot([e["seconds"] / 60 for e in seed["evals"]],
              [e["bits_per_byte"] for e in seed["evals"]], marker="o",
              color=f"C{i}", alpha=0.8, lw=1, ms=3,
              label=(f"{name} ({len(run['seeds'])} seeds)" if j == 0
                     else None))
  ax.axhline(GOAL_BPB, color="grey", ls="--", lw=0.8)
  ax.axvline(GOAL_S / 60, color="grey", ls=":", lw=0.8)
  ax.set_xlabel("wall-clock minutes from launch (2-core CPU, 8 simulated "
                "devices)")
  ax.set_ylabel("validation bits per byte")
  ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _kept(path: Path, names: list[str]) -> dict:
  """The runs of recipes not in `names` from the results file, when it was
  measured on this CPU (--only re-measures some recipes, keeps the rest)."""
  if not path.exists():
    return {}
  old = json.loads(path.read_text())
  if old["machine"]["cpu"] != common.cpu():
    return {}
  return {k: v for k, v in old["runs"].items()
          if k in RECIPES and k not in names}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default=",".join(RECIPES),
                      help="Comma-separated recipes to run.")
  parser.add_argument("--seeds", type=int, default=3,
                      help="Runs per recipe, with config.seed 0..N-1.")
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  names = common.parse_only(parser, args.only, RECIPES)
  if args.seeds < 1:
    parser.error(f"--seeds={args.seeds}: need at least 1.")
  runs = _kept(args.out, names)
  for name in names:
    recipe = RECIPES[name]
    runs[name] = {"args": recipe.args,
                  "bpe_vocab": recipe.bpe_vocab, "seeds": []}
    for seed in range(args.seeds):
      with tempfile.TemporaryDirectory() as tmp:
        measured = train(recipe, seed, Path(tmp))
      runs[name]["seeds"].append({"seed": seed, **measured})
      last = measured["evals"][-1]
      print(f"{name}, seed {seed}: {last['bits_per_byte']:.4f} bits per "
            f"byte at step {last['step']}, {last['seconds']:.0f} s; whole "
            f"validation split {measured['validation']['bits_per_byte']:.4f}",
            flush=True)
  path = common.write(NAME, {"runs": runs}, args.out)
  plot(json.loads(path.read_text()), path.with_suffix(".png"))
  print(f"wrote {path} and {path.with_suffix('.png')}")


def tables(results: dict) -> dict[str, str]:
  rows = []
  for name, run in _in_order(results["runs"]):
    lasts = [seed["evals"][-1] for seed in run["seeds"]]
    bpb = [e["bits_per_byte"] for e in lasts]
    whole = [seed["validation"]["bits_per_byte"] for seed in run["seeds"]]
    met = sum(any(e["bits_per_byte"] <= GOAL_BPB and e["seconds"] <= GOAL_S
                  for e in seed["evals"]) for seed in run["seeds"])
    rows.append([
        f"`{name}`", RECIPES[name].what, lasts[0]["step"],
        f"{statistics.median(bpb):.3f} ({min(bpb):.3f}-{max(bpb):.3f})",
        f"{statistics.median(e['seconds'] for e in lasts) / 60:.1f}",
        f"{met} of {len(lasts)}",
        f"{statistics.median(whole):.3f} ({min(whole):.3f}-{max(whole):.3f})"])
  return {"table": common.markdown(
      ["recipe", "what", "steps",
       "final bits per byte: median (range) over seeds",
       "minutes to the final eval (median)",
       f"seeds at ≤ {GOAL_BPB} within {GOAL_S // 60} minutes",
       "the final model on the whole validation split: median (range)"],
      rows, "llrrrrr")}


if __name__ == "__main__":
  main()
