r"""Exports the latest checkpoint of a run as a Hugging Face model folder.

python scripts/export_hf.py --workdir=runs/tiny --out=exports/tiny \
    [--dtype=bfloat16]

Then, in PyTorch:
    transformers.AutoModelForCausalLM.from_pretrained("exports/tiny")
    transformers.AutoTokenizer.from_pretrained("exports/tiny")
Writes config.json (LlamaForCausalLM, or Qwen2ForCausalLM for q/k/v
biases), generation_config.json, model.safetensors (shards and an index
above --max_shard_gb) and the tokenizer. A configuration Llama/Qwen2 cannot
express (a GELU MLP, experts) is refused; fused q/k/v is unfused.
"""
from absl import flags, logging

from lm.run import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_OUT = flags.DEFINE_string("out", None, "Folder to write.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Dtype of the written tensors.")
_MAX_SHARD = flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors "
                                "file, GiB (Hugging Face's default).")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Write into a "
                                  "non-empty --out.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh to restore onto; default: "
                            "the training mesh if it fits, else FSDP.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm.interop import hf_run  # noqa: PLC0415
  summary = hf_run.export_run(
      _WORKDIR.value, _OUT.value, dtype=_DTYPE.value, mesh=_MESH.value,
      overwrite=_OVERWRITE.value,
      max_shard_bytes=int(_MAX_SHARD.value * 2 ** 30))
  print(f"step {summary['step']} -> {_OUT.value}: "
        f"{summary['architecture']}, {summary['dtype']}, "
        f"{', '.join(summary['files'])}")


if __name__ == "__main__":
  cli.run(main)
