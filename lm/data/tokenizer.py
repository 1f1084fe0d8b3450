"""Tokenizers. Byte-level is the default: no files, no training, vocab 256."""
from __future__ import annotations

import numpy as np

from lm.checks import ConfigError


class ByteTokenizer:
  """UTF-8 bytes as tokens. Byte 0 (NUL, absent from text) ends a document."""
  vocab_size = 256
  eos_id = 0

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8)

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if int(i) != self.eos_id)
    return data.decode("utf-8", errors="replace")

  def num_bytes(self, text: str | bytes) -> int:
    return len(text.encode("utf-8") if isinstance(text, str) else text)


TOKENIZERS = {"byte": ByteTokenizer}


def get(name: str):
  if name not in TOKENIZERS:
    raise ConfigError(f"config.data.tokenizer={name!r} is unknown; use one of "
                     f"{sorted(TOKENIZERS)}.")
  return TOKENIZERS[name]()
