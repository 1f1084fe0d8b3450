r"""Trains a byte-level BPE tokenizer (GPT-2 style) on a config's corpus.

python scripts/train_tokenizer.py --config=configs/lm.py:tiny \
    --vocab_size=2048 --out=runs/tok2048
python scripts/train.py --config=configs/lm.py:tiny --workdir=runs/bpe \
    --config.data.tokenizer=runs/tok2048/tokenizer.json \
    --config.model.vocab_size=2048

Learns from the corpus's train split only (validation and test stay
unseen), writes OUT/tokenizer.json and OUT/tokenizer_config.json (what
transformers' AutoTokenizer loads) and prints the bytes per token on the
validation split and the command that trains with it. "<|endoftext|>" is
id 0 and ends each document; every byte has a token, so no text is unknown.
--config.data.* overrides pick the corpus as in training.
"""
import sys

from absl import flags, logging
from ml_collections import config_flags

from lm.checks import UsageError
from lm.run import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].")
_VOCAB = flags.DEFINE_integer("vocab_size", None, "Tokens, <|endoftext|> "
                              "and the 256 bytes included (>= 257).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the tokenizer to.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace a tokenizer "
                                  "already in --out.")
flags.mark_flags_as_required(["config", "vocab_size", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415
  from pathlib import Path  # noqa: PLC0415

  from lm.data import pipeline, tokenizer as tokenizer_lib  # noqa: PLC0415
  from lm.data import tokenizer_json  # noqa: PLC0415

  config = _CONFIG.value
  if _VOCAB.value < 257:
    raise UsageError(f"--vocab_size={_VOCAB.value} must be at least 257: "
                     "the 256 bytes and <|endoftext|>, plus the merges.")
  out = Path(os.path.expanduser(_OUT.value))
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out={_OUT.value} is a file; name a directory.")
  path = out / "tokenizer.json"
  if path.exists() and not _OVERWRITE.value:
    raise UsageError(f"--out={_OUT.value} already holds a tokenizer.json; "
                     "choose a new directory or pass --overwrite.")

  b = pipeline.prepare(config.data)
  train = b.as_data_source(split="train")
  texts = (train[i]["text"].decode("utf-8") for i in range(len(train)))
  trained = tokenizer_json.train_byte_bpe(texts, _VOCAB.value)
  out.mkdir(parents=True, exist_ok=True)
  tokenizer_config = {"eos_token": tokenizer_json.END_OF_TEXT,
                      "tokenizer_class": "PreTrainedTokenizerFast",
                      "model_max_length": config.model.max_len}
  (out / "tokenizer_config.json").write_text(
      json.dumps(tokenizer_config, indent=2) + "\n")
  trained.save(str(path))

  tok = tokenizer_lib.get(str(path))
  # The number a training run reports (and the tokens it reads: cached).
  validation = pipeline.load_tokens(b, "validation", tok)
  print(f"wrote {path}: vocab size {tok.vocab_size}, eos "
        f"{tokenizer_json.END_OF_TEXT!r} = {tok.eos_id}")
  if tok.vocab_size < _VOCAB.value:
    print(f"(the corpus supports no more than {tok.vocab_size} of the "
          f"{_VOCAB.value} tokens asked for)")
  print(f"validation: {validation.bytes_per_token:.3f} bytes/token "
        f"({len(validation.tokens):,} tokens)")
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.") and
               not a.startswith(("--config.data.tokenizer=",
                                 "--config.model.vocab_size="))]
  print("train with it:\n  python scripts/train.py "
        + " ".join([f"--config={config_arg()}", *overrides,
                    f"--config.data.tokenizer={path}",
                    f"--config.model.vocab_size={tok.vocab_size}",
                    "--workdir=WORKDIR"]))


def config_arg() -> str:
  """The --config value as given (the file and its :arg)."""
  for i, arg in enumerate(sys.argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
  return "CONFIG"


if __name__ == "__main__":
  cli.run(main)
