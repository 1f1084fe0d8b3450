"""A LoRA run -> a plain run: its adapters merged into its base
(scripts/merge_lora.py).

The plain run is an ordinary run directory, written like an imported one
(lm/interop/hf_run.py): config.json (the LoRA run's config with
config.lora.rank=0 and no config.train.init_from), checkpoints/0 holding the
merged parameters W + (alpha / rank) A B with a fresh optimizer state and no
data iterator, the tokenizer copied into OUT/tokenizer/ when it is a file,
and lora_merged.json saying where it came from. With config.lora.base_quant
the merged kernels are the dequantized int8/int4 base plus the update.
"""
from __future__ import annotations

import json

import jax

from lm import paths
from lm.checks import UsageError
from lm.interop import hf_run
from lm.run import loop, restore
from lm.train import lora, state as state_lib

SOURCE = "lora_merged.json"


def merge_run(workdir: str, out: str, *, mesh: str | None = None) -> dict:
  """Writes plain run directory `out` from LoRA run `workdir`'s latest
  adapters; refuses an `out` that is not empty. Returns a summary."""
  out_dir = paths.resolve(out)
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise UsageError(f"--out={out_dir} is not an empty directory; choose a "
                     "new one (nothing was written).")
  config = restore.load_config(workdir)
  if not lora.enabled(config):
    raise UsageError(f"--workdir={workdir} is not a LoRA run "
                     "(config.lora.rank=0): its parameters are plain already.")
  base = restore.lora_base(workdir)
  loaded = restore.load(workdir, mesh)
  config = lora.plain_config(config)  # The training mesh, not the load's.
  out_dir.mkdir(parents=True, exist_ok=True)
  if config.data.get("tokenizer", "byte") != "byte":
    config.data.tokenizer = hf_run.copy_tokenizer(config.data.tokenizer,
                                                  out_dir)
  with jax.set_mesh(loaded.setup.mesh):
    state = state_lib.state_from_params(loaded.setup, loaded.config,
                                        loaded.params)
    hf_run.save_step0(state, out_dir)
  loop.write_config(config, out_dir)
  summary = {"lora_workdir": str(paths.resolve(workdir)),
             "lora_step": loaded.step, "base": base,
             "parameters": state_lib.count_params(loaded.params)}
  if jax.process_index() == 0:
    (out_dir / SOURCE).write_text(json.dumps(summary, indent=2) + "\n")
  return summary
