r"""Compile time with JAX's persistent compilation cache, cold and warm.

    python benchmarks/compile_cache.py [--steps=20]

JAX writes each compiled program to disk when `JAX_COMPILATION_CACHE_DIR`
names a directory, and a later process that compiles the same program (the
same HLO, compile options, devices and jax version) loads it instead.
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0` caches every program: the
default (1 s) would leave out the small ones (init, eval, the optimizer's
setup), which together cost a run more than its train step.

Each case runs twice, each time in a fresh process, with one cache
directory that starts empty: `cold` compiles and writes the cache, `warm`
loads from it. The cases:
- the `bench` preset's train step in float32 and in bfloat16
  (scripts/benchmark.py, one round of 3 steps, no input pipeline): the
  step's trace, lowering and compile (`lower().compile()`), as
  docs/performance.md's speed tables time it;
- `configs/lm.py:demo` (bytes) for `--steps` steps with one eval and the
  final checkpoint, on the demo's 8 simulated devices: every trace,
  lowering and compile or cache load of the run (its time.json `compile_s`,
  lm/run/goodput.py) and the training process's wall time. The two runs'
  final losses must agree exactly (the same programs), or this fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common, demo

NAME = "compile_cache"
BENCH = ["scripts/benchmark.py", "--config=configs/lm.py:bench", "--steps=3",
         "--rounds=1", "--input_batches=0"]
PASSES = ("cold", "warm")


def cache_env(cache: Path, base: dict | None = None) -> dict:
  """The environment that caches every program in `cache`."""
  return dict(base or os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def bench_step(dtype: str, tmp: Path) -> dict:
  """{pass: the bench step's compile seconds}, cold then warm."""
  out = {}
  for name in PASSES:
    result = tmp / f"{name}.json"
    common.run([sys.executable, *BENCH, f"--out={result}",
                f"--config.precision.compute_dtype={dtype}"],
               env=cache_env(tmp / "cache", dict(os.environ,
                                                 JAX_PLATFORMS="cpu")))
    out[name] = {"compile_s": json.loads(result.read_text())
                 ["rows"]["ours"]["compile_s"]}
  return out


def demo_run(steps: int, tmp: Path) -> dict:
  """{pass: compile and wall seconds of a short demo run}, cold then warm."""
  out = {}
  for name in PASSES:
    workdir = tmp / name
    start = time.perf_counter()
    common.run([sys.executable, "scripts/train.py", f"--workdir={workdir}",
                *demo.ARGS, *common.few_steps(steps)],
               env=cache_env(tmp / "cache", common.simulated_devices()))
    wall = time.perf_counter() - start
    times = json.loads((workdir / "time.json").read_text())
    lines = [json.loads(s) for s in
             (workdir / "metrics.jsonl").read_text().splitlines() if s]
    out[name] = {"compile_s": times["compile_s"], "wall_s": wall,
                 "final_loss": [x for x in lines
                                if x["split"] == "train"][-1]["loss"]}
  if out["cold"]["final_loss"] != out["warm"]["final_loss"]:
    raise RuntimeError(f"the warm run's loss differs from the cold one's: "
                       f"{out}")
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=20,
                      help="Steps of the demo's runs.")
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  cases = {}
  for dtype in ("float32", "bfloat16"):
    with tempfile.TemporaryDirectory() as tmp:
      cases[f"bench step, {dtype}"] = bench_step(dtype, Path(tmp))
  with tempfile.TemporaryDirectory() as tmp:
    cases[f"a run of configs/lm.py:demo (bytes), {args.steps} steps"] = \
        demo_run(args.steps, Path(tmp))
  print(json.dumps(cases, indent=1))
  print(f"wrote {common.write(NAME, {'cases': cases}, args.out)}")


def tables(results: dict) -> dict[str, str]:
  rows = []
  for case, run in results["cases"].items():
    cold, warm = run["cold"], run["warm"]
    wall = (f"{cold['wall_s']:.1f}", f"{warm['wall_s']:.1f}") \
        if "wall_s" in cold else ("–", "–")
    rows.append([case, f"{cold['compile_s']:.2f}", f"{warm['compile_s']:.2f}",
                 f"{cold['compile_s'] / warm['compile_s']:.1f}x", *wall])
  return {"table": common.markdown(
      ["what", "compile, cold (s)", "compile, warm (s)", "cold / warm",
       "process wall, cold (s)", "process wall, warm (s)"], rows, "lrrrrr")}


if __name__ == "__main__":
  main()
