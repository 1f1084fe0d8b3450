r"""Imports a Hugging Face Llama / Mistral / Qwen2 model folder as a run.

python scripts/import_hf.py --hf_dir=~/models/SmolLM2-135M --workdir=runs/smol
python scripts/eval.py --workdir=runs/smol --split=test
python scripts/generate.py --workdir=runs/smol --prompt="ROMEO." \
    --temperature=0
python scripts/train.py --config=configs/run.py:runs/smol \
    --workdir=runs/smol_ft --config.train.init_from=runs/smol  # fine-tune

The folder: config.json, model.safetensors (or shards + index) and a
tokenizer (tokenizer.json or tokenizer.model; --tokenizer overrides). Every
config field is mapped or refused before any tensor is read; tensors are
read one at a time onto the mesh (--mesh; default FSDP over all devices);
in a multi-process job (the flags of train.py, or scripts/launch_local.py
--script=scripts/import_hf.py) each process reads only its devices' parts.
docs/interop.md has the field table and what is refused.
"""
from absl import flags, logging

from lm.run import cli

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model folder.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to write.")
_MESH = flags.DEFINE_string("mesh", None, "'data,fsdp,tensor' sizes or named "
                            "axes ('fsdp=4,tensor=2'); default fsdp=all.")
_MAX_LEN = flags.DEFINE_integer(
    "max_len", 0, "Positional limit of the run (config.model.max_len); 0 = "
    "the checkpoint's max_position_embeddings.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "A tokenizer.json or SentencePiece .model to use, or "
    "'byte'; default: the folder's own.")
_JOIN_JOB = cli.distributed_flags()
flags.mark_flags_as_required(["hf_dir", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  _JOIN_JOB()  # Several processes: each reads only its devices' parts.
  from lm.interop import hf_run  # noqa: PLC0415
  from lm.run.metrics_log import log  # noqa: PLC0415
  summary = hf_run.import_run(_HF_DIR.value, _WORKDIR.value, mesh=_MESH.value,
                              max_len=_MAX_LEN.value,
                              tokenizer=_TOKENIZER.value, warn=log)
  print(f"imported {summary['architecture']} ({summary['parameters']:,} "
        f"parameters, {summary['tensors']} tensors) from {summary['hf_dir']} "
        f"onto mesh {summary['mesh']} -> {_WORKDIR.value} (this process "
        f"read {summary['bytes_read'] / 2 ** 20:.4g} MiB)")


if __name__ == "__main__":
  cli.run(main)
