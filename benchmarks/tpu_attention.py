r"""Which attention implementation the TPU compiler expects to be fastest
for the 1b preset's train step: its step-time estimate per implementation.

    python benchmarks/tpu_attention.py      (minutes per plan; needs libtpu)

`attention_impl=auto` runs `chunked` on a TPU (lm/models/attention.py); the
alternatives a TPU can run are jax.nn's XLA lowering (`xla`) and chunked
with more query chunks. Each plan compiles the preset's own config (mesh,
remat, batch) ahead of time for the slice with scripts/aot_compile.py, as
benchmarks/aot.py does, and records the compiler's estimate and memory.
These are the compiler's figures, not measured steps: no TPU is reachable
here. Writes benchmarks/results/tpu_attention.json.
"""
from __future__ import annotations

import argparse
import json

from benchmarks import aot, common

NAME = "tpu_attention"
PRESET = "1b"
# A v5p slice and a v6e one that each hold the preset's batch.
SLICES = ("v5p:2x2x1", "v6e:4x4")
VARIANTS = {
    "auto": [],
    "xla": ["--config.model.attention_impl=xla"],
    "chunked, 4 chunks": ["--config.model.attention_chunks=4"],
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  plans = []
  for topology in SLICES:
    for name, extra in VARIANTS.items():
      plan = aot.compile_plan(PRESET, topology, "--nodecode", *extra)
      plans.append({"variant": name, **plan})
  path = common.write(NAME, {"plans": plans}, args.out)
  print(tables(json.loads(path.read_text()))["table"])
  print(f"\nwrote {path}")


def tables(results: dict) -> dict[str, str]:
  rows = []
  for plan in results["plans"]:
    train = plan.get("train")
    if not train:
      rows.append([plan["variant"], f"`{plan['topology']}`",
                   plan["error"].removeprefix("error: "), "", "", ""])
      continue
    step, mfu = aot.estimate(train)
    rows.append([plan["variant"], f"`{plan['topology']}`", plan["chips"],
                 f"{aot.gib(train['needed_bytes'])} / "
                 f"{aot.gib(train['hbm_bytes'])}", step, mfu])
  return {"table": common.markdown(
      ["attention (configs/lm.py:1b)", "slice", "chips",
       "train GiB per chip / usable", "step s (compiler)", "MFU (compiler)"],
      rows, "llrrrr")}


if __name__ == "__main__":
  main()
