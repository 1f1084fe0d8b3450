r"""What LoRA keeps per run, by preset: trainable parameters, optimizer
state and checkpoint bytes, against full fine-tuning.

    python benchmarks/lora_sizes.py

From each preset's train state built abstractly (jax.eval_shape: nothing
is allocated, so the 1B preset is sized on a laptop), with LoRA rank 8 on
every attention and MLP projection (configs/lm.py LAYERS; the 1b preset
with unscanned layers, which LoRA needs). A checkpoint holds the train
state: parameters and optimizer state (AdamW: two moments per trained
parameter); a LoRA checkpoint holds the adapters and theirs, not the base.
"""
from __future__ import annotations

import argparse
import sys

from benchmarks import common

NAME = "lora_sizes"
PRESETS = ("tiny", "1b")
RANK = 8


def _sizes(preset: str, rank: int) -> dict:
  import jax  # noqa: PLC0415

  from configs import lm  # noqa: PLC0415
  from lm import config as config_lib  # noqa: PLC0415
  from lm.parallel import make_mesh, rules as rules_lib  # noqa: PLC0415
  from lm.train import state as state_lib  # noqa: PLC0415
  config = lm.get_config(preset)
  config.model.scan_layers = False
  config.lora.rank = rank
  config.mesh = dict(data=1, stage=1, fsdp=1, expert=1, sequence=1, tensor=1)
  config = config_lib.resolve(config)
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh), rules_lib.use(rules_lib.Rules()):
    abstract = state_lib.make_setup(config, mesh).abstract_state
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize  # noqa: E731
                            for x in jax.tree.leaves(tree))
  return {"trainable": state_lib.count_params(abstract.params),
          "opt_state_bytes": nbytes(abstract.opt_state),
          "checkpoint_bytes": nbytes(abstract)}


def measure() -> dict:
  return {"rank": RANK, "presets": [
      {"preset": p, "full": _sizes(p, 0), "lora": _sizes(p, RANK)}
      for p in PRESETS]}


def _mb(n: int) -> str:
  return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def tables(results: dict) -> dict[str, str]:
  rows = []
  for r in results["presets"]:
    for kind, label in (("full", "full"), ("lora", f"LoRA r{results['rank']}")):
      s = r[kind]
      rows.append([r["preset"], label, f"{s['trainable']:,}",
                   _mb(s["opt_state_bytes"]), _mb(s["checkpoint_bytes"])])
  return {"sizes": common.markdown(
      ["preset", "fine-tuning", "trainable parameters", "optimizer state",
       "checkpoint"], rows, "llrrr")}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_out_flag(parser, NAME)
  args = parser.parse_args(argv[1:])
  data = measure()
  common.write(NAME, data, args.out, argv)
  print(tables(data)["sizes"])


if __name__ == "__main__":
  main(sys.argv)
