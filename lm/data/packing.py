"""Packing variable-length examples into fixed windows, with segment ids.

An example is {"inputs", "targets", "weights"}: 1-D arrays of one length n
(n next-token predictions; `weights` is 1 where the prediction counts in the
loss and 0 where it does not, e.g. an SFT prompt). Examples are packed
first-fit into windows of `length` by grain's FirstFitPackIterDataset, and a
packed batch is

  inputs, targets  int32 B x L
  segment_ids      int32 B x L: 1, 2, ... per example in its window, 0 on
                   padding (padding is a segment of its own, so no token's
                   attention row is ever empty)
  positions        int32 B x L: restart at 0 at each example (RoPE)
  weights          float32 B x L: the example's weights, 0 on padding.

The model attends only within a segment (lm/models/attention.py), so an
example's logits are those it gets alone. Documents longer than a window are
cut into pieces of at most `length` predictions first (`document_pieces`);
each piece is then an example of its own (positions restart), as MaxText and
Levanter do.

The train iterator is a grain DatasetIterator like the concatenated one
(lm/data/pipeline.py): its state, packer included, is checkpointed, so a
resumed run reads exactly the batches the uninterrupted one would. Every
process packs the same global batches and keeps its own rows.
"""
from __future__ import annotations

import itertools

import grain
import numpy as np

from lm.data import sources

FIELDS = ("inputs", "targets", "weights")


def document_pieces(ends: np.ndarray, length: int) -> np.ndarray:
  """[start, stop) token spans (P x 2) of the documents ending at `ends`
  (exclusive; the first starts at 0), each cut into pieces of at most
  `length` + 1 tokens that overlap by one: piece k's last token is piece
  k+1's first input, so every token after a document's first is predicted
  exactly once. A piece of fewer than 2 tokens (nothing to predict) is
  left out."""
  spans = []
  start = 0
  for end in np.asarray(ends).tolist():
    for s in range(start, end - 1, length):
      spans.append((s, min(s + length + 1, end)))
    start = end
  return np.asarray(spans, np.int64).reshape(-1, 2)


class Pieces(grain.sources.RandomAccessDataSource):
  """The examples of token spans: inputs = span[:-1], targets = span[1:],
  every prediction weighted 1."""

  def __init__(self, tokens: np.ndarray, spans: np.ndarray):
    self.tokens = tokens
    self.spans = spans

  def __len__(self) -> int:
    return len(self.spans)

  def __getitem__(self, i: int) -> dict:
    start, stop = self.spans[int(i)]
    piece = self.tokens[start:stop].astype(np.int32)
    return {"inputs": piece[:-1], "targets": piece[1:],
            "weights": np.ones(len(piece) - 1, np.float32)}


def _packed(examples: grain.IterDataset, length: int, bins: int,
            seed: int, shuffle_bins: bool) -> grain.IterDataset:
  packed = grain.experimental.FirstFitPackIterDataset(
      examples, length_struct={k: length for k in FIELDS},
      num_packing_bins=bins, seed=seed, shuffle_bins=shuffle_bins)
  return packed.map(lambda x: {
      "inputs": x["inputs"], "targets": x["targets"],
      "segment_ids": x["inputs_segment_ids"],
      "positions": x["inputs_positions"], "weights": x["weights"]})


def _rows(batch: dict, share_index: int, share_count: int) -> dict:
  rows = len(batch["inputs"]) // share_count
  return {k: v[share_index * rows:(share_index + 1) * rows]
          for k, v in batch.items()}


def train_iterator(examples: grain.MapDataset, *, length: int,
                   batch_size: int, seed: int, share_index: int = 0,
                   share_count: int = 1):
  """Endless packed batches of the examples, shuffled anew each epoch:
  this process's `batch_size // share_count` rows of each global batch."""
  if len(examples) == 0:
    raise sources.DataError("The training data has no examples to pack.")
  # One bin per row: the packer emits a global batch's worth of windows at
  # a time, so a window's neighbours in the batch come from the same span
  # of the shuffled order.
  ds = _packed(examples.shuffle(seed=seed).repeat().to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)),
               length, batch_size, seed, shuffle_bins=True)
  ds = ds.batch(batch_size, drop_remainder=True).map(
      lambda b: _rows(b, share_index, share_count))
  return iter(ds)


def eval_batches(examples: grain.MapDataset, *, length: int,
                 batch_size: int, max_batches: int, share_index: int = 0,
                 share_count: int = 1) -> list[dict]:
  """The examples packed in order (deterministic) into at most
  `max_batches` global batches; the last is padded with empty windows
  (weights 0). This process's rows of each."""
  packed = _packed(examples.to_iter_dataset(), length, batch_size, seed=0,
                   shuffle_bins=False)
  windows = list(itertools.islice(iter(packed), max_batches * batch_size))
  if not windows:
    raise sources.DataError("The validation data has no examples to pack.")
  empty = {k: np.zeros_like(v) for k, v in windows[0].items()}
  windows += [empty] * (-len(windows) % batch_size)
  batches = [{k: np.stack([w[k] for w in windows[i:i + batch_size]])
              for k in windows[0]}
             for i in range(0, len(windows), batch_size)]
  return [_rows(b, share_index, share_count) for b in batches]
