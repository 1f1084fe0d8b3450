"""Hugging Face `tokenizers` pipelines built here: a byte-level BPE trained
on a corpus, the byte tokenizer as a tokenizer.json, and a SentencePiece
model rewritten as one (what transformers loads without our code).

Nothing here knows the config; `lm.data.tokenizer` wraps these in its API.
"""
from __future__ import annotations

from typing import Iterable

from sentencepiece import sentencepiece_model_pb2
from tokenizers import (Regex, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, trainers)

END_OF_TEXT = "<|endoftext|>"  # GPT-2's end of document; id 0 in ours.
SPACE = "\u2581"  # SentencePiece's visible space.


def byte_to_unicode() -> dict[int, str]:
  """GPT-2's printable character for each byte: the alphabet of
  `pre_tokenizers.ByteLevel`, so byte b's token is this character."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:  # Control bytes and spaces go to 256, 257, ... in byte order.
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def train_byte_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """GPT-2-style byte-level BPE with END_OF_TEXT at id 0 and all 256 bytes
  in the vocabulary (no text is ever unknown). The corpus may support fewer
  than `vocab_size` tokens: the trainer stops when no pair repeats."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok


def byte_tokenizer() -> Tokenizer:
  """The byte tokenizer (token id = byte value) as a `tokenizers` pipeline:
  a BPE without merges over the 256 byte characters, no regex split (ids
  then never depend on where words start)."""
  chars = byte_to_unicode()
  tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)},
                             merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                               use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return tok


class Unsupported(ValueError):
  """A SentencePiece feature this conversion does not reproduce."""


# sentencepiece_model.proto: ModelProto.SentencePiece.Type, TrainerSpec.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2


def parse_spm(model_bytes: bytes):
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  return proto


def spm_tokenizer(model_bytes: bytes) -> Tokenizer:
  """A SentencePiece model (BPE or unigram) as a `tokenizers` pipeline that
  encodes text to the same ids as `sentencepiece` itself.

  Control pieces (<s>, </s>) stay out of the added tokens: sentencepiece
  never reads them from text, and transformers (told they are special,
  with split_special_tokens) does not either. Raises Unsupported for what
  is not reproduced (user-defined pieces, whitespace as suffix). Ids can
  still differ at exact ties: two unigram segmentations of equal score
  (seen once, in a long run of "#"), or, in principle, two BPE merges of
  equally scored pieces that overlap (sentencepiece takes the leftmost,
  this the lower id). write_hf_files tests a probe text before writing.
  """
  proto = parse_spm(model_bytes)
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  if spec.treat_whitespace_as_suffix:
    raise Unsupported("treat_whitespace_as_suffix=true")
  if any(p.type == USER_DEFINED for p in proto.pieces):
    raise Unsupported("user-defined pieces (--user_defined_symbols)")
  if spec.model_type not in (UNIGRAM, BPE):
    raise Unsupported(f"model_type={spec.model_type} (only BPE and unigram)")
  unk = proto.pieces[spec.unk_id].piece
  if spec.model_type == BPE:
    tok = Tokenizer(_spm_bpe(proto, unk))
  else:
    # Pieces sentencepiece never reads from text get a score no sequence
    # of characters loses to (unigram takes the best-scoring segmentation).
    vocab = [(p.piece, p.score if p.type == NORMAL else -1e9)
             for p in proto.pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=spec.unk_id,
                                   byte_fallback=spec.byte_fallback))
  tok.normalizer = _spm_normalizer(norm)
  # sentencepiece's words: one starts at each visible space (or run of
  # them, when whitespace-only pieces exist). No piece crosses them, so the
  # split changes no id; it keeps each word BPE or unigram works on short.
  word = (f"{SPACE}+[^{SPACE}]*" if spec.allow_whitespace_only_pieces
          else f"{SPACE}[^{SPACE}]*")
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
  steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(),
           decoders.Fuse()]
  if norm.add_dummy_prefix:
    steps.append(decoders.Strip(" ", 1, 0))
  tok.decoder = decoders.Sequence(steps)
  return tok


def _spm_bpe(proto, unk: str) -> models.BPE:
  """sentencepiece's BPE merges the adjacent pair whose concatenation is
  the highest-scoring piece; `tokenizers` merges the lowest-ranked pair.
  So every split of every piece into two pieces is a merge, ranked by the
  merged piece's score (ties by id)."""
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  mergeable = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces)
               if p.type == NORMAL}
  ranked = []
  for piece, (score, i) in mergeable.items():
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in mergeable and right in mergeable:
        ranked.append((-score, i, k, left, right))
  ranked.sort()
  return models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked],
                    unk_token=unk, fuse_unk=True,
                    byte_fallback=proto.trainer_spec.byte_fallback)


def _spm_normalizer(norm) -> normalizers.Normalizer:
  steps = []
  if norm.precompiled_charsmap:  # nmt_nfkc and friends; empty = identity.
    steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
  if norm.remove_extra_whitespaces:  # Spaces only, as sentencepiece does.
    steps += [normalizers.Replace(Regex("^ +| +$"), ""),
              normalizers.Replace(Regex(" {2,}"), " ")]
  if norm.add_dummy_prefix:
    steps.append(normalizers.Prepend(SPACE))
  if norm.escape_whitespaces:
    steps.append(normalizers.Replace(" ", SPACE))
  return normalizers.Sequence(steps)
