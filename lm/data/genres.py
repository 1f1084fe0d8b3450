"""Genre classification of Shakespeare passages: the grain pipeline.

The prepared `shakespeare_genres` tfds dataset (see `genre_builder.py`) ->
each work cut into non-overlapping windows of exactly config.data.seq_len
tokens of config.data.tokenizer (the short tail is dropped), labelled
with the work's genre -> this process's share ([share_index::share_count])
-> train: endless shuffled batches; eval: every test passage once, in order.

The poems give far fewer passages than the plays, so by default the train
stream samples the classes equally: an epoch has num_classes * (largest
class's count) slots, slot j draws class j % C, and each class walks through
its own reshuffled passage list as often as needed to fill its slots. All of it
is grain MapDataset index arithmetic, so the iterator's state is one integer
and a resumed run reads exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np
import tensorflow_datasets as tfds

from lm import metrics
from lm.data import pipeline, sources, tokenizer as tokenizer_lib
from lm.data.genre_builder import GENRES, ShakespeareGenres

DATASET = "shakespeare_genres"


def check(config, model_cfg) -> None:
  """config.data of a passage-classification run against the model."""
  _check_dataset(config.data)
  pipeline.check_tokens(config.data, model_cfg, config.data.seq_len)


def _check_dataset(data_cfg) -> None:
  name = data_cfg.dataset
  if name != DATASET:
    raise sources.DataError(
        f"config.data.dataset={name!r} is not a text-classification dataset "
        f"lm.data.genres knows; set config.data.dataset={DATASET!r}.")


def builder(data_cfg) -> tfds.core.DatasetBuilder:
  _check_dataset(data_cfg)
  return ShakespeareGenres(data_dir=str(pipeline.data_dir(data_cfg)),
                           file_format="array_record")


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
  """Prepares the dataset once (idempotent, safe to call concurrently)."""
  return pipeline.prepare_once(builder(data_cfg), pipeline.data_dir(data_cfg),
                               sources.fetch_shakespeare)


@dataclasses.dataclass(frozen=True)
class Passages:
  """A split's passages, works in name order, each work's in text order."""
  tokens: np.ndarray  # N x L, of pipeline.token_dtype(vocab size).
  labels: np.ndarray  # N int32 genre ids.
  works: tuple[str, ...]  # N work names (for error analysis).

  def __len__(self) -> int:
    return len(self.labels)

  def share(self, share_index: int, share_count: int) -> Passages:
    s = slice(share_index, None, share_count)
    return Passages(self.tokens[s], self.labels[s], self.works[s])


def load_passages(b: tfds.core.DatasetBuilder, split: str, *, length: int,
                  tok) -> Passages:
  source = b.as_data_source(split=split)
  # Sorted by name so the order does not depend on how tfds wrote the shards.
  examples = sorted((source[i] for i in range(len(source))),
                    key=lambda ex: ex["name"])
  dtype = pipeline.token_dtype(tok.vocab_size)
  tokens, labels, works = [], [], []
  for ex in examples:
    ids = tok.encode(ex["text"].decode("utf-8"))
    n = len(ids) // length
    tokens.append(np.asarray(ids[:n * length], dtype).reshape(n, length))
    labels += [int(ex["genre"])] * n
    works += [ex["name"].decode()] * n
  return Passages(np.concatenate(tokens), np.asarray(labels, np.int32),
                  tuple(works))


class _PassageSource(grain.sources.RandomAccessDataSource):

  def __init__(self, passages: Passages):
    self.passages = passages

  def __len__(self) -> int:
    return len(self.passages)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    return {"tokens": self.passages.tokens[i].astype(np.int32),
            "label": np.int32(self.passages.labels[i])}


def _class_seed(seed: int, c: int) -> int:
  # Distinct, fixed per-class seeds: grain shuffles pass k with seed + k.
  return (seed * 1_000_003 + 7_919 * (c + 1)) % 2**32


def _balanced(passages: Passages, seed: int,
              num_classes: int) -> grain.MapDataset:
  """An epoch of num_classes * max_count slots; slot j draws class j % C."""
  source = grain.MapDataset.source(_PassageSource(passages))
  per_class = []
  for c in range(num_classes):
    idx = np.flatnonzero(passages.labels == c)
    # Indexing a shuffled MapDataset past its length reads a fresh
    # permutation per pass: small classes are oversampled without repeats
    # inside a pass, and which of their passages repeat changes every epoch.
    per_class.append(grain.MapDataset.source(idx).shuffle(
        seed=_class_seed(seed, c)))
  max_count = max(len(p) for p in per_class)
  epoch_len = num_classes * max_count

  def draw(i: int, slot: int) -> dict:
    epoch = i // epoch_len
    c, k = slot % num_classes, slot // num_classes
    return source[int(per_class[c][epoch * max_count + k])]

  return (grain.MapDataset.range(epoch_len).shuffle(seed=seed).repeat()
          .map_with_index(draw))


def train_iterator(passages: Passages, *, batch_size: int, seed: int,
                   balance_classes: bool, num_classes: int):
  """Endless shuffled batches {"tokens": b x L int32, "label": b int32}."""
  if balance_classes:
    ds = _balanced(passages, seed, num_classes)
  else:
    ds = grain.MapDataset.source(_PassageSource(passages)).shuffle(
        seed=seed).repeat()
  ds = ds.batch(batch_size, drop_remainder=True)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                   prefetch_buffer_size=2)))


def train_source(config):
  """(every train passage as random access to {"tokens", "label"}, None):
  what Poisson sampling draws from (no augmentation of text)."""
  passages = load_passages(prepare(config.data), "train",
                           length=_seq_len(config),
                           tok=tokenizer_lib.get(config.data.tokenizer))
  return _PassageSource(passages), None


@dataclasses.dataclass
class TextClassData:
  train: object  # grain DatasetIterator: {"tokens": b x L int32, "label": b}.
  eval: list[dict]  # {"tokens", "label", "mask"}: every test passage once.
  num_classes: int
  class_names: tuple[str, ...]
  num_train: int  # Passages in this process's share of train.
  num_eval: int  # Real (mask 1) passages in this process's eval batches.
  train_class_counts: np.ndarray  # Passages per class, before balancing.
  eval_class_counts: np.ndarray


def _seq_len(config) -> int:
  length = config.data.seq_len
  if not isinstance(length, int) or length <= 0:
    raise sources.DataError(
        f"config.data.seq_len={length!r} must be a positive number of tokens "
        "per passage (e.g. 256).")
  return length


def make(config, share_index: int = 0,
         share_count: int = 1) -> TextClassData:
  """Prepares (if needed) and opens the dataset named by config.data."""
  _check_dataset(config.data)
  length = _seq_len(config)
  batch_size = config.train.batch_size // share_count
  if batch_size < 1:
    raise sources.DataError(
        f"config.train.batch_size={config.train.batch_size} is smaller than "
        f"the {share_count} processes; make it a multiple of that.")
  tok = tokenizer_lib.get(config.data.tokenizer)
  b = prepare(config.data)
  num_classes = len(GENRES)
  all_train = load_passages(b, "train", length=length, tok=tok)
  all_test = load_passages(b, "test", length=length, tok=tok)
  train = all_train.share(share_index, share_count)
  test = all_test.share(share_index, share_count)
  train_counts = np.bincount(train.labels, minlength=num_classes)
  balance = config.data.balance_classes
  if len(train) < batch_size:
    raise sources.DataError(
        f"The train split has {len(train)} passages of config.data.seq_len="
        f"{length} for this process, fewer than one batch of {batch_size}: "
        "lower config.train.batch_size or config.data.seq_len.")
  if balance and not train_counts.all():
    missing = [GENRES[c] for c in np.flatnonzero(train_counts == 0)]
    raise sources.DataError(
        f"No train passages of config.data.seq_len={length} for {missing} in "
        "this process, so config.data.balance_classes=True cannot sample "
        "them: lower config.data.seq_len or set balance_classes=False.")
  if len(test) == 0:
    raise sources.DataError(
        f"The test split has no passages of config.data.seq_len={length} for "
        "this process: lower config.data.seq_len.")
  return TextClassData(
      train=train_iterator(train, batch_size=batch_size, seed=config.seed,
                           balance_classes=balance, num_classes=num_classes),
      eval=pipeline.masked_batches(
          {"tokens": test.tokens.astype(np.int32), "label": test.labels},
          batch_size=batch_size, global_rows=len(all_test),
          share_count=share_count),
      num_classes=num_classes,
      class_names=GENRES,
      num_train=len(train),
      num_eval=len(test),
      train_class_counts=train_counts,
      eval_class_counts=np.bincount(test.labels, minlength=num_classes))


def majority_baseline(eval_labels, train_class_counts) -> dict:
  """Scores of always predicting the most frequent train class (the lowest
  id on a tie) on `eval_labels` (real passages only: drop mask-0 rows).

  Macro F1 averages over all len(train_class_counts) classes, like the
  model's; with every class among the eval labels (every genre is in the
  test split) that equals sklearn's default f1_score(average="macro").
  """
  labels = np.asarray(eval_labels).ravel()
  if labels.size == 0:
    raise sources.DataError("majority_baseline needs at least one eval label.")
  num_classes = len(train_class_counts)
  majority = int(np.argmax(train_class_counts))
  probs_NxC = np.zeros((labels.size, num_classes))
  probs_NxC[:, majority] = 1.0
  scores = metrics.classification(labels, probs_NxC)
  return {"majority_class": majority, "accuracy": scores["accuracy"],
          "macro_f1": scores["f1"]}
