"""From a prepared tfds corpus to batches: the grain pipeline.

tfds.data_source (random access over documents) -> tokens of
config.data.tokenizer (cached on disk unless bytes), documents joined with
an end-of-document token -> windows of seq_len + 1 tokens (each starts where
the previous one's inputs end) -> shuffle (a new order every epoch, fixed
by the seed) -> global batches -> this process's rows of each. Windows, not
documents, are shuffled: a corpus of 42 plays would give a very coarse
shuffle otherwise.

The iterator is a grain `DatasetIterator`: its state is checkpointed with the
model so a resumed run reads exactly the batches the uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os

import grain
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from lm import checks, paths
from lm.data import packing, sources, text_corpus, tokenizer as tokenizer_lib

CORPORA = ("shakespeare", "python_stdlib", "text_dir")
# config.data.packing: concat = windows cut from the documents joined with
# EOS (attention crosses documents); segments = documents packed into
# windows with segment ids (lm/data/packing.py).
PACKINGS = ("concat", "segments")


def seq_len(config) -> int:
  """Training window length: config.data.seq_len, or the model's max_len."""
  return config.data.seq_len or config.model.max_len


def data_dir(data_cfg) -> epath.Path:
  """config.data.data_dir, else $LM_DATA_DIR, else ~/.cache/lm/
  tensorflow_datasets; a local path or a URI (gs://...)."""
  return paths.resolve(data_cfg.data_dir or os.environ.get("LM_DATA_DIR")
                       or "~/.cache/lm/tensorflow_datasets")


def check_tokens(data_cfg, model_cfg, length: int) -> None:
  """config.data.tokenizer (it loads, and fits the model's vocabulary), and
  the window (or passage) `length` against the positional limit."""
  vocab = tokenizer_lib.get(data_cfg.tokenizer).vocab_size
  checks.require(model_cfg.vocab_size >= vocab,
                 f"config.model.vocab_size={model_cfg.vocab_size} is smaller "
                 f"than the {vocab} tokens of config.data.tokenizer="
                 f"{data_cfg.tokenizer!r}; set --config.model.vocab_size="
                 f"{vocab} (or more).")
  checks.require(0 < length <= model_cfg.max_len,
                 f"config.data.seq_len={length} must be positive and at most "
                 "the model's positional limit config.model.max_len="
                 f"{model_cfg.max_len}; lower seq_len or raise max_len.")


def check(config, model_cfg) -> None:
  """config.data of a language-modeling run (before anything is read)."""
  data = config.data
  checks.one_of(data.corpus, CORPORA, "config.data.corpus")
  checks.one_of(data.packing, PACKINGS, "config.data.packing")
  # A key the user set and the run would ignore is an error.
  checks.require(
      data.corpus == "text_dir" or not data.text_dir,
      f"config.data.text_dir={data.text_dir!r} is set but config.data.corpus="
      f"{data.corpus!r} does not read it; add --config.data.corpus=text_dir "
      "to train on that directory, or drop text_dir.")
  checks.require(
      not (data.sft.train or data.sft.eval),
      "config.data.sft is set but config.task=lm does not read it; add "
      "--config.task=sft to fine-tune on it, or drop the sft keys.")
  check_tokens(data, model_cfg, seq_len(config))
  if data.corpus == "text_dir":
    sources.text_dir_files(data.text_dir)


def builder(data_cfg) -> tfds.core.DatasetBuilder:
  corpus = data_cfg.corpus
  if corpus not in CORPORA:
    raise sources.DataError(f"config.data.corpus={corpus!r} is unknown; use "
                            f"one of {CORPORA}.")
  config = (text_corpus.text_dir_config(data_cfg.text_dir)
            if corpus == "text_dir" else corpus)
  return text_corpus.TextCorpus(config=config, data_dir=str(data_dir(data_cfg)),
                                file_format="array_record")


@contextlib.contextmanager
def file_lock(path):
  """Serializes preparation across processes (e.g. parallel test workers) on
  a local disk. A bucket has no locks: prepare it once, before the job."""
  if paths.is_remote(path):
    yield
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare_once(b: tfds.core.DatasetBuilder, root: epath.Path,
                 fill_manual_dir=None) -> tfds.core.DatasetBuilder:
  """Prepares builder `b` under `root` once (idempotent, safe to call
  concurrently). `fill_manual_dir(path)` puts the raw files in place first:
  tfds wants the manual dir filled before it starts."""
  tfds.disable_progress_bar()
  config_name = b.builder_config.name if b.builder_config else "default"
  with file_lock(root / f".prepare-{b.name}-{config_name}.lock"):
    if not b.is_prepared():
      manual_dir = root / "downloads" / "manual"
      if fill_manual_dir is not None:
        fill_manual_dir(manual_dir)
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=str(manual_dir)))
  return b


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
  """Prepares the corpus once (idempotent, safe to call concurrently)."""
  fill = (sources.fetch_shakespeare if data_cfg.corpus == "shakespeare"
          else None)
  return prepare_once(builder(data_cfg), data_dir(data_cfg), fill)


@dataclasses.dataclass(frozen=True)
class SplitTokens:
  tokens: np.ndarray  # All documents of the split, each followed by EOS.
  num_bytes: int  # UTF-8 bytes of text behind those tokens.
  # Where each document (with its EOS) ends in `tokens`, exclusive: what
  # config.data.packing=segments packs.
  doc_ends: np.ndarray

  @property
  def bytes_per_token(self) -> float:
    return self.num_bytes / len(self.tokens)


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest integer type that holds every id: a token array of a 32k
  vocabulary takes half the memory (and cache) of int32."""
  if vocab_size <= 256:
    return np.dtype(np.uint8)
  return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def load_tokens(b: tfds.core.DatasetBuilder, split: str,
                tok) -> SplitTokens:
  """All documents of `split`, tokenized, each followed by tok.eos_id.

  Byte tokens are cheap and computed every time; any other tokenizer's are
  computed once and cached under the data dir, keyed by the tokenizer's
  fingerprint (its file's contents): a changed tokenizer file is never read
  through an old cache.
  """
  if tok.fingerprint == "byte":
    return _tokenize(b, split, tok)
  config_name = b.builder_config.name if b.builder_config else "default"
  folder = (epath.Path(b.data_dir_root) / "tokens" / b.name / config_name /
            str(b.version) / tok.fingerprint)
  # The split as prepared: a corpus prepared again (another Python's
  # stdlib under the same name) is tokenized again.
  info = b.info.splits[split]
  source = f"{info.num_examples} documents, {int(info.num_bytes)} bytes"
  cached = _read_cache(folder, split, source)
  if cached is not None:
    return cached
  # Processes sharing the disk tokenize once; the others wait and read.
  with file_lock(folder / f".{split}.lock"):
    cached = _read_cache(folder, split, source)
    if cached is None:
      cached = _tokenize(b, split, tok)
      _write_cache(folder, split, cached, {
          "source": source, "tokenizer": tok.spec,
          "fingerprint": tok.fingerprint})
  return cached


def _tokenize(b: tfds.core.DatasetBuilder, split: str, tok) -> SplitTokens:
  source = b.as_data_source(split=split)
  dtype = token_dtype(tok.vocab_size)
  pieces, num_bytes, ends = [], 0, []
  eos = np.array([tok.eos_id], dtype)
  for i in range(len(source)):
    text = source[i]["text"]
    ids = tok.encode(text)
    if len(ids):
      pieces += [ids.astype(dtype), eos]
      num_bytes += tok.num_bytes(text)
      ends.append((ends[-1] if ends else 0) + len(ids) + 1)
  if not pieces:
    raise sources.DataError(f"The {split!r} split of {b.builder_config.name!r}"
                            f" in {b.data_dir} is empty.")
  return SplitTokens(np.concatenate(pieces), num_bytes,
                     np.asarray(ends, np.int64))


def _read_cache(folder: epath.Path, split: str,
                source: str) -> SplitTokens | None:
  """The cached split, or None if absent, not whole (the JSON is written
  last, so a JSON means its array was complete) or of another `source`."""
  meta_path = folder / f"{split}.json"
  if not meta_path.exists():
    return None
  try:
    meta = json.loads(meta_path.read_text())
    with (folder / f"{split}.npy").open("rb") as f:
      tokens = np.load(f, allow_pickle=False)
    # A cache written before documents' ends were kept has none: stale.
    with (folder / f"{split}.ends.npy").open("rb") as f:
      ends = np.load(f, allow_pickle=False)
  except (OSError, ValueError):  # Damaged: tokenized afresh.
    return None
  if (not isinstance(meta, dict) or meta.get("source") != source
      or len(tokens) != meta.get("num_tokens")
      or not len(ends) or ends[-1] != len(tokens)):
    return None
  return SplitTokens(tokens, meta["num_bytes"], ends)


def _write_cache(folder: epath.Path, split: str, split_tokens: SplitTokens,
                 about: dict) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  meta = {"num_tokens": len(split_tokens.tokens),
          "num_bytes": split_tokens.num_bytes,
          "dtype": split_tokens.tokens.dtype.name, **about}
  # Each file appears whole or not at all: written aside, then renamed.
  suffix = f".tmp-{os.getpid()}"
  for name, array in ((f"{split}.npy", split_tokens.tokens),
                      (f"{split}.ends.npy", split_tokens.doc_ends)):
    npy_tmp = folder / f"{name}{suffix}"
    with npy_tmp.open("wb") as f:
      np.save(f, array, allow_pickle=False)
    npy_tmp.replace(folder / name)
  json_tmp = folder / f"{split}.json{suffix}"
  json_tmp.write_text(json.dumps(meta, indent=1))
  json_tmp.replace(folder / f"{split}.json")


class Windows(grain.sources.RandomAccessDataSource):
  """Windows of `length` + 1 tokens (inputs + shifted targets), window i
  starting at token i * `stride`. The default stride, `length`, starts each
  where the previous one's inputs end: every token is predicted once.
  `stride` = `length` + 1 makes the windows disjoint (no token in two):
  DP-SGD's examples (`PrivateWindows`)."""

  def __init__(self, tokens: np.ndarray, length: int,
               stride: int | None = None):
    self.tokens = tokens
    self.length = length
    self.stride = stride or length

  def __len__(self) -> int:
    return max(0, (len(self.tokens) - self.length - 1) // self.stride + 1)

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.stride
    return self.tokens[start:start + self.length + 1].astype(np.int32)


class PrivateWindows(Windows):
  """DP-SGD's training examples (lm/data/poisson.py samples them): the
  fixed enumeration of disjoint windows of `length` + 1 tokens of the
  split's token stream, each an example {"tokens": L+1}. Disjoint, so that
  adding or removing one example changes one window's tokens only (the
  first token of each is an input, never a target)."""

  def __init__(self, tokens: np.ndarray, length: int):
    super().__init__(tokens, length, stride=length + 1)

  def __getitem__(self, i: int) -> dict:
    return {"tokens": super().__getitem__(i)}


def private_windows(config) -> PrivateWindows:
  """The training split of config.data as DP-SGD's examples (prepared and
  tokenized first if needed)."""
  tok = tokenizer_lib.get(config.data.tokenizer)
  tokens = load_tokens(prepare(config.data), "train", tok).tokens
  windows = PrivateWindows(tokens, seq_len(config))
  if not len(windows):
    raise sources.DataError(
        f"The training split has {len(tokens)} tokens, fewer than one "
        f"window of {seq_len(config) + 1}: DP-SGD has no example to sample; "
        "lower config.data.seq_len (or config.model.max_len).")
  return windows


def _share(batches: grain.MapDataset, share_index: int, share_count: int):
  """This process's rows of every global batch.

  `batches` holds chunks of global_batch / share_count consecutive elements
  of the global order; chunk k belongs to share k mod share_count. So every
  process count cuts the same global batches, and a process reads (and
  tokenizes, and copies) only its own rows.
  """
  return batches[share_index::share_count]


def train_iterator(tokens: np.ndarray, *, length: int, batch_size: int,
                   seed: int, share_index: int = 0, share_count: int = 1,
                   stride: int | None = None):
  """Endless shuffled batches: this process's `batch_size // share_count`
  rows of each global batch of `batch_size` windows (`Windows`' stride:
  `length + 1` shuffles DP-SGD's disjoint windows)."""
  windows = grain.MapDataset.source(Windows(tokens, length, stride))
  if len(windows) < batch_size:
    raise sources.DataError(
        f"The training split has {len(windows)} windows of "
        f"config.data.seq_len+1={length + 1} tokens, fewer than one batch of "
        f"{batch_size}: lower config.train.batch_size or config.model.max_len,"
        " or add text.")
  rows = batch_size // share_count
  ds = _share(windows.shuffle(seed=seed).repeat().batch(rows,
                                                        drop_remainder=True),
              share_index, share_count).map(lambda t: {"tokens": t})
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                   prefetch_buffer_size=2)))


def eval_batches(tokens: np.ndarray, *, length: int, batch_size: int,
                 max_batches: int, share_index: int = 0,
                 share_count: int = 1) -> list[dict]:
  """The first `max_batches` global batches of the split, in order
  (deterministic); this process's rows of each."""
  windows = grain.MapDataset.source(Windows(tokens, length))
  n = min(max_batches, len(windows) // batch_size)
  if n == 0:
    raise sources.DataError(
        f"The validation split has {len(windows)} windows of "
        f"config.data.seq_len+1={length + 1} tokens, fewer than one batch of "
        f"{batch_size}: lower config.train.batch_size or config.model.max_len.")
  mine = _share(windows.batch(batch_size // share_count, drop_remainder=True),
                share_index, share_count)
  return [{"tokens": mine[b]} for b in range(n)]


def masked_batches(columns: dict[str, np.ndarray], *, batch_size: int,
                   global_rows: int, share_count: int = 1,
                   pad_values: dict | None = None) -> list[dict]:
  """This process's rows once, in order, in whole batches with a "mask"
  (1 real row, 0 padding; padding takes `pad_values[key]`, else 0).

  Every process gets the same number of batches, sized for the largest share
  of the `global_rows`: a multi-host eval step needs a batch from each.
  """
  largest_share = math.ceil(global_rows / share_count)
  total = math.ceil(largest_share / batch_size) * batch_size
  rows = len(next(iter(columns.values())))
  padded = {}
  for key, values in columns.items():
    full = np.full((total, *values.shape[1:]),
                   (pad_values or {}).get(key, 0), values.dtype)
    full[:rows] = values
    padded[key] = full
  padded["mask"] = (np.arange(total) < rows).astype(np.float32)
  return [{k: v[s:s + batch_size] for k, v in padded.items()}
          for s in range(0, total, batch_size)]


@dataclasses.dataclass
class Data:
  # grain DatasetIterator of {"tokens": B_local x (L+1)}, or of packed
  # batches (lm/data/packing.py) with config.data.packing=segments.
  train: object
  eval: list[dict]  # Fixed validation batches.
  tokenizer: object
  eval_bytes_per_token: float


def make(config, share_index: int = 0, share_count: int = 1,
         train=None) -> Data:
  """Prepares (if needed) and opens the corpus named by `config.data`.

  The global batches are the same for every process count; this process
  gets rows [i*B/n, (i+1)*B/n) of each, with (i, n) = (share_index,
  share_count) from `lm.parallel.mesh.batch_share`. `train`: an iterator
  to train from instead of the shuffled windows (DP-SGD's Poisson batches).
  """
  tok = tokenizer_lib.get(config.data.tokenizer)
  if train is not None:
    return Data(train=train, tokenizer=tok, **eval_data(
        config, "validation", config.train.eval_batches, share_index,
        share_count))
  b = prepare(config.data)
  train_tokens = load_tokens(b, "train", tok)
  if config.data.packing == "segments":
    train = packing.train_iterator(
        _pieces(config, train_tokens), length=seq_len(config),
        batch_size=config.train.batch_size, seed=config.seed,
        share_index=share_index, share_count=share_count)
  else:
    train = train_iterator(
        train_tokens.tokens, length=seq_len(config),
        batch_size=config.train.batch_size, seed=config.seed,
        share_index=share_index, share_count=share_count)
  return Data(train=train, tokenizer=tok, **eval_data(
      config, "validation", config.train.eval_batches, share_index,
      share_count))


def _pieces(config, split: SplitTokens) -> grain.MapDataset:
  """The documents of a split as packing examples (lm/data/packing.py)."""
  return grain.MapDataset.source(packing.Pieces(
      split.tokens, packing.document_pieces(split.doc_ends, seq_len(config))))


def eval_data(config, split: str, max_batches: int, share_index: int = 0,
              share_count: int = 1) -> dict:
  """{"eval": the first `max_batches` global batches of `split` (this
  process's rows), cut as config.data.packing says, "eval_bytes_per_token":
  its UTF-8 bytes per token}."""
  tok = tokenizer_lib.get(config.data.tokenizer)
  tokens = load_tokens(prepare(config.data), split, tok)
  make_batches = (functools.partial(packing.eval_batches,
                                    _pieces(config, tokens))
                  if config.data.packing == "segments"
                  else functools.partial(eval_batches, tokens.tokens))
  return {"eval": make_batches(length=seq_len(config),
                               batch_size=config.train.batch_size,
                               max_batches=max_batches,
                               share_index=share_index,
                               share_count=share_count),
          "eval_bytes_per_token": tokens.bytes_per_token}
