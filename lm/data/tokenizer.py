"""Tokenizers: `config.data.tokenizer` is "byte" (the default: UTF-8 bytes,
no files, vocab 256), a Hugging Face tokenizer.json (the `tokenizers`
library) or a SentencePiece .model file.

`get(spec)` returns an object with the `Tokenizer` protocol below. Every
problem with a spec is a ConfigError naming config.data.tokenizer, raised
by the data section's check (lm.data.pipeline.check_tokens) before anything
compiles. `write_hf_files` writes what `transformers.AutoTokenizer` loads
into the same ids (for export); `find_in_hf_dir` finds the file an HF model
folder holds (for import).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np

from lm.checks import ConfigError

KEY = "config.data.tokenizer"
# End (and beginning) of document tokens, by name, when a tokenizer.json
# comes without a tokenizer_config.json (or special_tokens_map.json) that
# names them.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")
FILE_KINDS = "'byte', a Hugging Face tokenizer.json or a SentencePiece .model"


class Tokenizer(Protocol):
  spec: str  # What config.data.tokenizer said.
  fingerprint: str  # "byte", or a hash of the file(s): keys token caches.
  vocab_size: int  # Every id encode or a special token can give, + 1.
  eos_id: int  # Ends each document in the token stream.
  bos_id: int | None

  def encode(self, text: str | bytes) -> np.ndarray:
    """Ids of the text, without special tokens added."""

  def decode(self, ids) -> str:
    """The text of `ids`, special tokens dropped."""

  def num_bytes(self, text: str | bytes) -> int:
    """UTF-8 bytes of the text (bits per byte = loss * tokens / bytes)."""


def _utf8(text: str | bytes) -> bytes:
  return text.encode("utf-8") if isinstance(text, str) else text


def _text(text: str | bytes) -> str:
  return text if isinstance(text, str) else text.decode("utf-8")


class ByteTokenizer:
  """UTF-8 bytes as tokens. Byte 0 (NUL, absent from text) ends a document."""
  spec = fingerprint = "byte"
  vocab_size = 256
  eos_id = 0
  bos_id = None

  def encode(self, text: str | bytes) -> np.ndarray:
    return np.frombuffer(_utf8(text), dtype=np.uint8)

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if int(i) != self.eos_id)
    return data.decode("utf-8", errors="replace")

  def num_bytes(self, text: str | bytes) -> int:
    return len(_utf8(text))


class HFTokenizer:
  """A Hugging Face tokenizer.json, through the `tokenizers` library."""

  def __init__(self, spec: str, path: Path):
    import tokenizers  # noqa: PLC0415 (only runs that use one pay for it)
    raw = _read(spec, path)
    try:
      self.tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    # tokenizers raises a bare Exception; bytes that are no UTF-8 a
    # UnicodeDecodeError.
    except Exception as e:  # noqa: BLE001
      raise _unreadable(spec, "a Hugging Face tokenizer.json file", e) from e
    # A tokenizer.json may ask for truncation or padding; ids must be the
    # text's, whole.
    self.tok.no_truncation()
    self.tok.no_padding()
    self.spec, self.path = spec, path
    vocab = self.tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    names = _hf_special_names(path.parent, spec)
    special = {t.content for t in self.tok.get_added_tokens_decoder().values()
               if t.special}
    for key, (name, where) in names.items():
      if name not in vocab:
        raise ConfigError(
            f"{KEY}={spec!r}: {where} names {key} {name!r}, which is not a "
            "token of the tokenizer; fix that name in it.")
    names = {key: name for key, (name, _) in names.items()}
    self.eos_id = _special_id(vocab, names.get("eos_token"), EOS_NAMES,
                              special)
    if self.eos_id is None:
      raise ConfigError(
          f"{KEY}={spec!r} names no end-of-document token: put a "
          f"tokenizer_config.json with \"eos_token\" next to it, or add one "
          f"of {list(EOS_NAMES)} to it as a special token.")
    self.bos_id = _special_id(vocab, names.get("bos_token"), BOS_NAMES,
                              special)
    self.added_special = frozenset(special)
    self.unk = getattr(self.tok.model, "unk_token", None)
    # What decode drops: every special token, whatever marks it special.
    ids = {vocab[t] for t in special}
    ids |= {i for i in (self.eos_id, self.bos_id, vocab.get(self.unk))
            if i is not None}
    self.special_ids = frozenset(ids)
    self.fingerprint = _fingerprint(raw, self.eos_id, self.bos_id)

  def encode(self, text: str | bytes) -> np.ndarray:
    ids = self.tok.encode(_text(text), add_special_tokens=False).ids
    return np.asarray(ids, np.int32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    return self.tok.decode([i for i in ids if i not in self.special_ids
                            and 0 <= i < self.vocab_size],
                           skip_special_tokens=True)

  def num_bytes(self, text: str | bytes) -> int:
    return len(_utf8(text))


class SentencePieceTokenizer:
  """A SentencePiece .model file, through the `sentencepiece` library."""

  def __init__(self, spec: str, path: Path):
    import sentencepiece  # noqa: PLC0415
    raw = _read(spec, path)
    self.sp = sentencepiece.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(raw)
    except Exception as e:  # noqa: BLE001 (RuntimeError, or protobuf's)
      shown = (ValueError("it does not parse as a SentencePiece model")
               if "ParseFromArray" in str(e) else e)  # sentencepiece's words.
      raise _unreadable(spec, "a SentencePiece model file", shown) from e
    self.spec, self.path, self.model_bytes = spec, path, raw
    self.vocab_size = self.sp.get_piece_size()
    if self.sp.eos_id() < 0:
      raise ConfigError(
          f"{KEY}={spec!r} has no end-of-sentence piece (eos_id=-1), which "
          "ends each document: train it with --eos_id=N (N >= 0), or use "
          "another tokenizer.")
    self.eos_id = self.sp.eos_id()
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    # Control pieces (<s>, </s>) and <unk>: what decode drops, as
    # transformers' skip_special_tokens does.
    self.special_ids = frozenset(
        i for i in range(self.vocab_size)
        if self.sp.is_control(i) or self.sp.is_unknown(i))
    self.fingerprint = _fingerprint(raw, self.eos_id, self.bos_id)

  def encode(self, text: str | bytes) -> np.ndarray:
    return np.asarray(self.sp.encode(_text(text)), np.int32)

  def decode(self, ids) -> str:
    # Ids past the tokenizer's (a model's padded vocabulary can sample
    # them) are no text.
    return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size
                           and int(i) not in self.special_ids])

  def num_bytes(self, text: str | bytes) -> int:
    return len(_utf8(text))


def _read(spec: str, path: Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as e:
    raise _unreadable(spec, "a readable file", e) from e


def _unreadable(spec: str, what: str, error: Exception) -> ConfigError:
  reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return ConfigError(
      f"{KEY}={spec!r} is not {what} ({reason}); point it at a "
      f"tokenizer.json or a SentencePiece .model, or use 'byte'.")


def _fingerprint(raw: bytes, eos_id: int, bos_id: int | None) -> str:
  """The file's contents, and the ids a tokenizer_config.json may pick:
  the token stream (documents joined by eos) depends on both."""
  h = hashlib.sha256(raw)
  h.update(f"\0eos={eos_id},bos={bos_id}".encode())
  return h.hexdigest()[:16]


# Where a Hugging Face folder names its special tokens (the first wins).
SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _hf_special_names(folder: Path, spec: str) -> dict[str, tuple[str, Path]]:
  """{"eos_token"/"bos_token": (name, file)} from the JSON files beside a
  tokenizer.json, each name a string or {"content": ...}."""
  names = {}
  for path in (folder / name for name in SPECIAL_FILES):
    if not path.exists():
      continue
    try:
      config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise ConfigError(
          f"{KEY}={spec!r}: {path} beside it is not readable JSON ({e}); fix"
          " or remove it.") from e
    for key in ("eos_token", "bos_token"):
      value = config.get(key) if isinstance(config, dict) else None
      if isinstance(value, dict):
        value = value.get("content")
      if isinstance(value, str) and key not in names:
        names[key] = (value, path)
  return names


def _special_id(vocab: dict[str, int], named: str | None,
                candidates: tuple[str, ...], special: set[str]) -> int | None:
  if named is not None:
    return vocab.get(named)
  return next((vocab[c] for c in candidates if c in special), None)


def _resolve(spec) -> tuple[str, Path]:
  """(kind, absolute path) of a spec, or the ConfigError it deserves."""
  if not isinstance(spec, str) or not spec:
    raise ConfigError(f"{KEY}={spec!r} is unknown; use {FILE_KINDS} file.")
  path = Path(os.path.expanduser(spec)).absolute()
  if path.is_dir():
    found = find_in_hf_dir(path)
    raise ConfigError(
        f"{KEY}={spec!r} is a directory; name the file: "
        + (f"--config.data.tokenizer={found}." if found else
           f"use {FILE_KINDS} file."))
  kind = {".json": "json", ".model": "model"}.get(path.suffix)
  if kind is None:
    raise ConfigError(f"{KEY}={spec!r} is unknown; use {FILE_KINDS} file "
                      "(by its .json or .model name).")
  if not path.exists():
    raise ConfigError(f"{KEY}={spec!r}: no such file ({path}); point it at "
                      f"an existing tokenizer file, or use 'byte'.")
  return kind, path


def _stat(path: Path) -> tuple[int, int] | None:
  try:
    st = path.stat()
  except OSError:
    return None
  return st.st_mtime_ns, st.st_size


def get(spec: str) -> Tokenizer:
  """The tokenizer `config.data.tokenizer` names; loaded once per version of
  its file (path, modification time and size), so repeated calls are cheap."""
  if spec == "byte":
    return ByteTokenizer()
  kind, path = _resolve(spec)
  # A tokenizer.json's eos can come from the files beside it.
  beside = (tuple(_stat(path.parent / name) for name in SPECIAL_FILES)
            if kind == "json" else None)
  return _load(spec, kind, str(path), _stat(path), beside)


@functools.lru_cache(maxsize=16)
def _load(spec: str, kind: str, path: str, stat, beside_stat) -> Tokenizer:
  del stat, beside_stat  # Only keys of the cache.
  cls = HFTokenizer if kind == "json" else SentencePieceTokenizer
  return cls(spec, Path(path))


def same(spec_a: str, spec_b: str) -> bool:
  """Whether two config.data.tokenizer values give the same token ids
  (equal fingerprints, whatever the paths); ConfigError if one does not
  load."""
  return get(spec_a).fingerprint == get(spec_b).fingerprint


def find_in_hf_dir(hf_dir) -> Path | None:
  """The tokenizer file of a Hugging Face model folder: tokenizer.json if it
  has one (what transformers itself prefers), else tokenizer.model."""
  for name in ("tokenizer.json", "tokenizer.model"):
    path = Path(hf_dir) / name
    if path.is_file():
      return path
  return None


def write_hf_files(tok: Tokenizer, out_dir) -> Path:
  """Writes tokenizer.json (+ tokenizer.model for SentencePiece) and
  tokenizer_config.json into `out_dir` so that transformers'
  `AutoTokenizer.from_pretrained(out_dir)` encodes (add_special_tokens=False)
  and decodes (skip_special_tokens=True) as `tok` does. Returns out_dir."""
  from lm.data import tokenizer_json  # noqa: PLC0415
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  config = {"tokenizer_class": "PreTrainedTokenizerFast"}
  if isinstance(tok, ByteTokenizer):
    tokenizer_json.byte_tokenizer().save(str(out / "tokenizer.json"))
    # Id 0's token is the character GPT-2 maps byte 0 to, "Ā", which is
    # also text: split_special_tokens keeps transformers from reading a
    # literal "Ā" as the special token (ours reads it as 2 bytes).
    config.update(eos_token=tokenizer_json.byte_to_unicode()[0],
                  split_special_tokens=True)
  elif isinstance(tok, HFTokenizer):
    shutil.copyfile(tok.path, out / "tokenizer.json")
    config.update(_names(tok.tok.id_to_token, tok))
    if tok.unk:
      config["unk_token"] = tok.unk  # Dropped by decode, as ours does.
    if not tok.added_special:
      # Its special tokens are then only the ones named here, which
      # `tokenizers` never reads from text; nor then should transformers.
      config["split_special_tokens"] = True
  elif isinstance(tok, SentencePieceTokenizer):
    (out / "tokenizer.model").write_bytes(tok.model_bytes)
    _spm_tokenizer_json(tok).save(str(out / "tokenizer.json"))
    # sentencepiece never reads <s> or </s> from text; nor then should
    # transformers.
    config.update(_names(tok.sp.id_to_piece, tok), split_special_tokens=True,
                  unk_token=tok.sp.id_to_piece(tok.sp.unk_id()))
  else:
    raise ConfigError(f"{KEY}: cannot write Hugging Face files for a "
                      f"{type(tok).__name__}.")
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2)
                                             + "\n")
  return out


def _names(id_to_token, tok) -> dict[str, str]:
  names = {"eos_token": id_to_token(tok.eos_id)}
  if tok.bos_id is not None:
    names["bos_token"] = id_to_token(tok.bos_id)
  return names


# Text a converted SentencePiece model must encode as sentencepiece does
# before it is written out: spaces, tabs and newlines in runs, digits,
# accents, other scripts, emoji (byte fallback), markup-like text.
PROBE = ("  Hello,  wörld!\tTabs\t\tand\n\nnew lines ; numbers 3.14159 and "
         "2025 — ünïcödé, ﬁ ＡＢＣ, 中文字符 日本語 한국어 Ελληνικά русский "
         "🤗🚀 <s> </s> <unk> <0x41>   def f(x):\n        return x  \n")


def _spm_tokenizer_json(tok: SentencePieceTokenizer):
  from lm.data import tokenizer_json  # noqa: PLC0415
  why = ""
  try:
    converted = tokenizer_json.spm_tokenizer(tok.model_bytes)
  except tokenizer_json.Unsupported as e:
    converted, why = None, str(e)
  if converted is not None:
    got = converted.encode(PROBE, add_special_tokens=False).ids
    if got == tok.encode(PROBE).tolist():
      return converted
    why = "the converted tokenizer encodes a test text differently"
  raise ConfigError(
      f"{KEY}={tok.spec!r}: transformers cannot load this SentencePiece model"
      f" so that it encodes as sentencepiece does ({why}); train with 'byte' "
      "or a tokenizer.json to export to Hugging Face.")
