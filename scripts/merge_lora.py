r"""Merges a LoRA run's adapters into its base: a plain run directory.

python scripts/merge_lora.py --workdir=runs/tiny_lora --out=runs/tiny_merged

The new run holds W + (alpha / rank) A B for every adapted kernel (with
config.lora.base_quant, the dequantized int8/int4 base plus the update) in a
step-0 checkpoint, config.json without LoRA, and the tokenizer. Every tool
reads a LoRA run merged already (generate, eval, export_hf); this writes it
once, e.g. to fine-tune it further or to ship it without the base run.
"""
from absl import flags, logging

from lm.run import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The LoRA run directory.")
_OUT = flags.DEFINE_string("out", None, "The plain run directory to write "
                           "(new or empty).")
_MESH = flags.DEFINE_string("mesh", None, "Mesh to merge on; default: the "
                            "training mesh if it fits, else FSDP.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm.interop import lora_run  # noqa: PLC0415
  summary = lora_run.merge_run(_WORKDIR.value, _OUT.value, mesh=_MESH.value)
  print(f"merged step {summary['lora_step']} of {summary['lora_workdir']} "
        f"into step {summary['base']['step']} of {summary['base']['workdir']}"
        f" -> {_OUT.value} ({summary['parameters']:,} parameters)")


if __name__ == "__main__":
  cli.run(main)
