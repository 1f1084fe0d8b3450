"""Tokenizers ("byte", a tokenizer.json, a SentencePiece .model) on real
files from PyPI packages (Mistral's 32k SentencePiece model, GPT-2's BPE
ranks), checked against their own libraries, an independent BPE and
transformers; token caches per tokenizer; every bad spec named."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import regex
import sentencepiece as spm
import tokenizers

from conftest import BASE_XLA_FLAGS, REPO, tiny_config
from tokenizer_files import gpt2_ranks, real_files  # noqa: F401 - a fixture.
from lm import config as config_lib
from lm.checks import ConfigError
from lm.data import genres, pipeline
from lm.data import tokenizer as tokenizer_lib
from lm.data import tokenizer_json

# Text that tells tokenizers apart: runs of spaces, leading and trailing
# spaces, tabs, newlines, accents, other scripts, emoji, markup-like text,
# "Ā" (what GPT-2's byte alphabet writes byte 0 as).
TEXTS = ["Hello world", "héllo — ünïcode", "  two  spaces ", " leading",
         "trailing ", "a\tb\t\tc\n\nnew\n", "ROMEO.\nWhat light", "Ā, ﬁ, ＡＢＣ",
         "中文字符 日本語 한국어 Ελληνικά", "emoji 🤗🚀", "<s> </s> <unk> <0x41>",
         "<|endoftext|> in text", "def f(x):\n        return x  # 3.14159",
         " " * 20 + "x", ""]
WORDS = ("the quick brown fox jumps over a lazy dog; héllo wörld, naïve café — "
         "thou art more lovely and more temperate").split()


# GPT-2's pre-tokenizer and tiktoken's merge loop, written out: the
# independent reference for GPT-2's ids.
GPT2_WORDS = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"""
                           r"""| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _gpt2_reference(text: str, ranks: dict[bytes, int]) -> list[int]:
  ids = []
  for word in GPT2_WORDS.findall(text):
    parts = [bytes([b]) for b in word.encode()]
    while len(parts) > 1:
      pairs = [ranks.get(parts[i] + parts[i + 1], 1 << 30)
               for i in range(len(parts) - 1)]
      i = int(np.argmin(pairs))  # The leftmost of equal ranks, as tiktoken.
      if pairs[i] == 1 << 30:
        break
      parts[i:i + 2] = [parts[i] + parts[i + 1]]
    ids += [ranks[p] for p in parts]
  return ids


def _shakespeare(data_dir: str, n: int = 20_000) -> str:
  b = pipeline.prepare(_lm_data(data_dir=data_dir))
  return b.as_data_source(split="validation")[0]["text"].decode()[:n]


def _lm_data(**kw):
  data = config_lib.base("transformer").data
  data.update(kw)
  return data


def _model(vocab_size=256, max_len=32):
  model = config_lib.base("transformer").model
  model.update(vocab_size=vocab_size, max_len=max_len)
  return model


def _sentencepiece(tmp_path: Path, name: str = "sp.model", **kw) -> Path:
  """A small SentencePiece model trained here (a tenth of a second) on
  Python's os.py and some accented words."""
  lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(9))
           for i in range(300)]
  lines += Path(os.__file__).read_text().splitlines()
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines),
                                 model_writer=model, minloglevel=2,
                                 **{"vocab_size": 300, **kw})
  path = tmp_path / name
  path.write_bytes(model.getvalue())
  return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A text_dir corpus of 6 documents and a byte-level BPE trained on its
  train split, as scripts/train_tokenizer.py trains one."""
  root = tmp_path_factory.mktemp("tokenizer_corpus")
  texts = root / "texts"
  texts.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    lines = [" ".join(rng.choice(WORDS, 12)) for _ in range(120)]
    (texts / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
  data = _lm_data(corpus="text_dir", text_dir=str(texts),
                  data_dir=str(root / "tfds"))
  b = pipeline.prepare(data)
  train = b.as_data_source(split="train")
  tok = tokenizer_json.train_byte_bpe(
      (train[i]["text"].decode() for i in range(len(train))), 300)
  out = root / "bpe"
  out.mkdir()
  tok.save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(
      json.dumps({"eos_token": "<|endoftext|>"}))
  return {"data": data, "builder": b, "path": out / "tokenizer.json",
          "root": root}


def test_byte_tokenizer_keeps_its_behaviour():
  tok = tokenizer_lib.get("byte")
  assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (256, 0, None)
  assert tok.spec == tok.fingerprint == "byte"
  ids = tok.encode("héllo")
  assert ids.dtype == np.uint8 and list(ids) == list("héllo".encode())
  assert tok.decode([104, 0, 105]) == "hi"  # eos dropped.
  assert tok.num_bytes("héllo") == 6


def test_sentencepiece_model_encodes_as_sentencepiece(real_files, data_dir):
  tok = tokenizer_lib.get(str(real_files["mistral"]))
  sp = spm.SentencePieceProcessor(model_file=str(real_files["mistral"]))
  assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (32000, 2, 1)
  assert tok.encode("Hello").tolist() == [22557]  # "▁Hello".
  for text in [*TEXTS, _shakespeare(data_dir)]:
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.tolist() == sp.encode(text), text
    assert tok.decode(ids) == sp.decode(ids.tolist())
  hello = tok.encode("Hello world").tolist()
  # Control pieces dropped; only the text's first space is a dummy prefix.
  assert tok.decode([1, *hello, 2, *hello]) == "Hello world Hello world"
  # <unk> is special too (transformers skips it); ids past the tokenizer's
  # (a padded model vocabulary can sample them) are no text.
  assert tok.decode([0, *hello, 32_005]) == "Hello world"
  assert tok.num_bytes("héllo") == 6


def test_gpt2_encodes_as_an_independent_bpe(real_files, data_dir):
  """A tokenizer.json with no tokenizer_config.json: <|endoftext|> (a
  special added token) is eos; ids past 256 take uint16 tokens."""
  tok = tokenizer_lib.get(str(real_files["gpt2"]))
  ranks = gpt2_ranks(real_files["gpt2_ranks"])
  assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (50257, 50256, None)
  assert tok.encode("Hello world").tolist() == [15496, 995]
  # (The reference reads "<|endoftext|>" as text, tokenizers as the token.)
  texts = [t for t in TEXTS if "<|" not in t]
  for text in [*texts, _shakespeare(data_dir, 5_000)]:
    assert tok.encode(text).tolist() == _gpt2_reference(text, ranks), text
    assert tok.decode(tok.encode(text)) == text
  assert tok.decode([15496, 50256, 995]) == "Hello world"
  assert pipeline.token_dtype(tok.vocab_size) == np.uint16


@pytest.fixture(params=["byte", "bpe", "mistral", "gpt2"])
def any_tokenizer(request, corpus, real_files):
  spec = {"byte": "byte", "bpe": str(corpus["path"])}.get(
      request.param) or str(real_files.get(request.param))
  return tokenizer_lib.get(spec)


def test_hf_files_load_in_transformers_as_ours(any_tokenizer, tmp_path,
                                               data_dir):
  from transformers import AutoTokenizer  # noqa: PLC0415
  tok = any_tokenizer
  out = tokenizer_lib.write_hf_files(tok, tmp_path / "hf")
  hf = AutoTokenizer.from_pretrained(str(out))
  assert hf.eos_token_id == tok.eos_id
  # Between two texts: eos, and every other special token (<s>, <unk>).
  specials = [tok.eos_id, *sorted(getattr(tok, "special_ids", ()))]
  for text in [*TEXTS, _shakespeare(data_dir, 3_000)]:
    ids = tok.encode(text).tolist()
    assert hf.encode(text, add_special_tokens=False) == ids, text
    joined = [*ids, *specials, *ids]
    assert hf.decode(joined, skip_special_tokens=True) == tok.decode(joined)
  # And back: the folder's own file is a tokenizer that encodes the same.
  found = tokenizer_lib.find_in_hf_dir(out)
  assert found == out / "tokenizer.json"
  back = tokenizer_lib.get(str(found))
  assert back.eos_id == tok.eos_id and back.bos_id == tok.bos_id
  for text in TEXTS:
    ids = tok.encode(text).tolist()
    assert back.encode(text).tolist() == ids, text
    joined = [*ids, *specials, *ids]
    assert back.decode(joined) == tok.decode(joined)
  # Exported again (a run imported from that folder, then exported).
  again = AutoTokenizer.from_pretrained(
      str(tokenizer_lib.write_hf_files(back, tmp_path / "again")))
  for text in TEXTS:
    ids = tok.encode(text).tolist()
    assert again.encode(text, add_special_tokens=False) == ids, text
    joined = [*ids, *specials, *ids]
    assert again.decode(joined, skip_special_tokens=True) == tok.decode(joined)


def test_a_sentencepiece_export_transformers_cannot_reproduce_is_refused(
    tmp_path):
  path = _sentencepiece(tmp_path, user_defined_symbols=["<sep>"])
  tok = tokenizer_lib.get(str(path))
  assert tok.encode("a <sep> b").tolist() == spm.SentencePieceProcessor(
      model_file=str(path)).encode("a <sep> b")
  with pytest.raises(ConfigError, match=r"config.data.tokenizer=.*transformers"
                     r" cannot load this SentencePiece model.*user-defined"):
    tokenizer_lib.write_hf_files(tok, tmp_path / "hf")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_trained_sentencepiece_models_export_faithfully(model_type, tmp_path):
  """sentencepiece's default normalization (nmt_nfkc, extra spaces
  removed) goes through the conversion too."""
  from transformers import AutoTokenizer  # noqa: PLC0415
  tok = tokenizer_lib.get(str(_sentencepiece(tmp_path,
                                             model_type=model_type)))
  hf = AutoTokenizer.from_pretrained(
      str(tokenizer_lib.write_hf_files(tok, tmp_path / "hf")))
  for text in TEXTS:
    assert hf.encode(text, add_special_tokens=False) == tok.encode(
        text).tolist(), text


def test_a_conversion_that_encodes_differently_is_refused(real_files,
                                                         tmp_path,
                                                         monkeypatch):
  tok = tokenizer_lib.get(str(real_files["mistral"]))
  monkeypatch.setattr(tokenizer_json, "spm_tokenizer",
                      lambda _: tokenizer_json.byte_tokenizer())
  with pytest.raises(ConfigError, match="encodes a test text differently"):
    tokenizer_lib.write_hf_files(tok, tmp_path / "hf")


def test_trained_bpe_feeds_the_lm_pipeline(corpus):
  tok = tokenizer_lib.get(str(corpus["path"]))
  assert (tok.vocab_size, tok.eos_id) == (300, 0)
  config = tiny_config(**{f"data.{k}": v for k, v in corpus["data"].items()})
  config.data.tokenizer = str(corpus["path"])
  config.model.vocab_size = 300
  pipeline.check(config, config.model)
  data = pipeline.make(config)
  assert data.eval_bytes_per_token > 1.5  # Bytes: 1 or less.
  b = corpus["builder"]
  for split in ("train", "validation"):
    tokens = pipeline.load_tokens(b, split, tok).tokens
    assert tokens.dtype == np.uint16
    docs = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)[:-1]
    source = b.as_data_source(split=split)
    assert [tok.decode(d) for d in docs] == [
        source[i]["text"].decode() for i in range(len(source))]
  # The eval batches are the validation stream, in order; a training row is
  # one of the train windows.
  stream = np.concatenate([row[:-1] for batch in data.eval
                           for row in batch["tokens"]])
  np.testing.assert_array_equal(
      stream, pipeline.load_tokens(b, "validation", tok).tokens[:len(stream)])
  windows = pipeline.Windows(pipeline.load_tokens(b, "train", tok).tokens, 32)
  row = next(data.train)["tokens"][0]
  assert any(np.array_equal(row, windows[i]) for i in range(len(windows)))


def test_token_cache_is_reused_and_keyed_by_the_tokenizer(corpus, tmp_path,
                                                          monkeypatch):
  b = corpus["builder"]
  path = tmp_path / "tokenizer.json"
  path.write_bytes(corpus["path"].read_bytes())
  tok = tokenizer_lib.get(str(path))
  first = pipeline.load_tokens(b, "validation", tok)
  folder = (Path(b.data_dir_root) / "tokens" / b.name / b.builder_config.name
            / str(b.version) / tok.fingerprint)
  assert {"validation.json", "validation.npy"} <= {
      p.name for p in folder.iterdir()}
  assert np.load(folder / "validation.npy", allow_pickle=False).dtype == \
      np.uint16
  assert json.loads((folder / "validation.json").read_text())[
      "num_bytes"] == first.num_bytes

  def no_encoding(text):
    raise AssertionError("tokenized again instead of read from the cache")
  monkeypatch.setattr(tok, "encode", no_encoding)
  again = pipeline.load_tokens(b, "validation", tok)
  np.testing.assert_array_equal(again.tokens, first.tokens)
  assert again.num_bytes == first.num_bytes
  monkeypatch.undo()

  # The same path with other contents (another vocabulary): another
  # tokenizer, another cache, tokenized afresh.
  train = b.as_data_source(split="train")
  other = tokenizer_json.train_byte_bpe(
      (train[i]["text"].decode() for i in range(len(train))), 280)
  other.save(str(path))
  os.utime(path, ns=(1, 1))  # Even with the old mtime, the size differs.
  tok2 = tokenizer_lib.get(str(path))
  assert tok2 is not tok and tok2.fingerprint != tok.fingerprint
  calls = []
  encode = tok2.encode
  monkeypatch.setattr(tok2, "encode", lambda t: calls.append(1) or encode(t))
  second = pipeline.load_tokens(b, "validation", tok2)
  assert calls and len(second.tokens) > len(first.tokens)
  assert (folder.parent / tok2.fingerprint / "validation.npy").exists()


def test_a_damaged_cache_is_tokenized_afresh(corpus):
  b, tok = corpus["builder"], tokenizer_lib.get(str(corpus["path"]))
  first = pipeline.load_tokens(b, "test", tok)
  folder = (Path(b.data_dir_root) / "tokens" / b.name / b.builder_config.name
            / str(b.version) / tok.fingerprint)
  (folder / "test.npy").write_bytes(b"\x93NUMPY garbage")
  np.testing.assert_array_equal(pipeline.load_tokens(b, "test", tok).tokens,
                                first.tokens)
  assert not list(folder.glob("*.tmp-*"))  # Written aside, then renamed.
  # A cache of the split as prepared before (other documents) is not read.
  meta = json.loads((folder / "test.json").read_text())
  (folder / "test.json").write_text(json.dumps(
      dict(meta, source="1 documents, 10 bytes")))
  np.save(folder / "test.npy", np.zeros(meta["num_tokens"], np.uint16))
  np.testing.assert_array_equal(pipeline.load_tokens(b, "test", tok).tokens,
                                first.tokens)


def test_byte_tokens_are_not_cached(corpus):
  b = corpus["builder"]
  tokens = pipeline.load_tokens(b, "validation", tokenizer_lib.get("byte"))
  assert tokens.tokens.dtype == np.uint8 and tokens.bytes_per_token <= 1
  assert not (Path(b.data_dir_root) / "tokens" / b.name /
              b.builder_config.name / str(b.version) / "byte").exists()


def test_token_dtype_is_the_smallest_that_holds_every_id():
  assert pipeline.token_dtype(256) == np.uint8
  assert pipeline.token_dtype(257) == np.uint16
  assert pipeline.token_dtype(65536) == np.uint16
  assert pipeline.token_dtype(65537) == np.int32


def test_get_loads_each_version_of_a_file_once(corpus, tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_bytes(corpus["path"].read_bytes())
  tok = tokenizer_lib.get(str(path))
  assert tokenizer_lib.get(str(path)) is tok
  # A tokenizer.json that asks for truncation still gives every id.
  truncating = tokenizers.Tokenizer.from_file(str(path))
  truncating.enable_truncation(4)
  truncating.save(str(tmp_path / "truncating.json"))
  text = " ".join(WORDS)
  assert len(tokenizer_lib.get(str(tmp_path / "truncating.json")).encode(
      text)) == len(tok.encode(text)) > 4
  # The eos can come from the tokenizer_config.json beside the file: a new
  # one is a new tokenizer with another fingerprint (its stream differs).
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"eos_token": {"content": "a", "special": True}}))
  named = tokenizer_lib.get(str(path))
  assert named.eos_id == named.tok.token_to_id("a") != tok.eos_id
  assert named.fingerprint != tok.fingerprint


class _Builder:
  """What genres.load_passages reads of a tfds builder."""

  def __init__(self, examples):
    self.examples = examples

  def as_data_source(self, split):
    return self.examples


def test_genre_passages_take_any_tokenizer(corpus):
  tok = tokenizer_lib.get(str(corpus["path"]))
  text = " ".join(WORDS * 20)
  b = _Builder([{"name": b"w", "text": text.encode(), "genre": 2}])
  passages = genres.load_passages(b, "train", length=16, tok=tok)
  ids = tok.encode(text)
  assert passages.tokens.dtype == np.uint16
  assert passages.tokens.shape == (len(ids) // 16, 16)
  np.testing.assert_array_equal(passages.tokens.ravel(),
                                ids[:passages.tokens.size])
  config = config_lib.base("transformer_classifier")
  config.data.update(tokenizer=str(corpus["path"]), seq_len=16)
  with pytest.raises(ConfigError, match=r"config.model.vocab_size=256 .*"
                     r"config.data.tokenizer="):
    genres.check(config, config.model)
  config.model.vocab_size = 300
  genres.check(config, config.model)


def _bad(tmp_path, name, content: bytes | None = None) -> str:
  path = tmp_path / name
  if content is not None:
    path.write_bytes(content)
  return str(path)


BAD = {
    "missing": (lambda p: _bad(p, "nope.json"), "no such file"),
    "missing_model": (lambda p: _bad(p, "nope.model"), "no such file"),
    "garbage_json": (lambda p: _bad(p, "t.json", os.urandom(64)),
                     "is not a Hugging Face tokenizer.json file"),
    "truncated_json": (lambda p: _bad(p, "t.json", b'{"version": "1.0", "m'),
                       "is not a Hugging Face tokenizer.json file"),
    "garbage_model": (lambda p: _bad(p, "t.model", b"\x00\xff" * 40),
                      "is not a SentencePiece model file"),
    "unknown_name": (lambda p: "gpt2", "is unknown; use 'byte'"),
    "text_file": (lambda p: _bad(p, "vocab.txt", b"a\nb\n"), "is unknown"),
    "empty": (lambda p: "", "is unknown"),
    "directory": (lambda p: str(p), "is a directory"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_tokenizer_is_one_config_error_naming_the_key(case, tmp_path):
  make, message = BAD[case]
  data = _lm_data(tokenizer=make(tmp_path))
  with pytest.raises(ConfigError, match=rf"^config\.data\.tokenizer=.*"
                     rf"{message}") as e:
    pipeline.check_tokens(data, _model(), 16)
  assert "\n" not in str(e.value)


def test_a_tokenizer_larger_than_the_model_names_both_keys(corpus):
  data = _lm_data(tokenizer=str(corpus["path"]))
  with pytest.raises(ConfigError, match=r"config\.model\.vocab_size=256 is "
                     r"smaller than the 300 tokens of config\.data\.tokenizer="
                     r".*--config\.model\.vocab_size=300"):
    pipeline.check_tokens(data, _model(256), 16)
  pipeline.check_tokens(data, _model(300), 16)


def test_a_tokenizer_json_without_an_eos_says_what_to_add(tmp_path):
  tok = tokenizer_json.byte_tokenizer()  # No special tokens at all.
  tok.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ConfigError, match=r"config\.data\.tokenizer=.*no "
                     r"end-of-document token: put a tokenizer_config\.json "
                     r"with \"eos_token\""):
    pipeline.check_tokens(_lm_data(tokenizer=str(tmp_path / "tokenizer.json")),
                          _model(), 16)
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<nope>"}')
  with pytest.raises(ConfigError, match=r"names eos_token '<nope>', which is "
                     r"not a token"):
    tokenizer_lib.get(str(tmp_path / "tokenizer.json"))


def test_a_sentencepiece_model_without_eos_is_refused(tmp_path):
  path = _sentencepiece(tmp_path, eos_id=-1)
  with pytest.raises(ConfigError, match=r"config\.data\.tokenizer=.*eos_id=-1"):
    tokenizer_lib.get(str(path))
  tok = tokenizer_lib.get(str(_sentencepiece(tmp_path, "b.model", bos_id=-1)))
  assert tok.bos_id is None and tok.eos_id == 2


def test_find_in_hf_dir_prefers_tokenizer_json(tmp_path):
  assert tokenizer_lib.find_in_hf_dir(tmp_path) is None
  (tmp_path / "tokenizer.model").write_bytes(b"x")
  assert tokenizer_lib.find_in_hf_dir(tmp_path) == tmp_path / "tokenizer.model"
  (tmp_path / "tokenizer.json").write_text("{}")
  assert tokenizer_lib.find_in_hf_dir(tmp_path) == tmp_path / "tokenizer.json"


@pytest.mark.slow
def test_train_tokenizer_script(corpus, tmp_path):
  data = corpus["data"]
  args = ["--config=configs/lm.py:tiny", "--config.data.corpus=text_dir",
          f"--config.data.text_dir={data.text_dir}",
          f"--config.data.data_dir={data.data_dir}"]

  def run(*extra):
    return subprocess.run(
        [sys.executable, "scripts/train_tokenizer.py", *args, *extra],
        cwd=REPO, env=dict(os.environ, XLA_FLAGS=BASE_XLA_FLAGS),
        capture_output=True, text=True, timeout=300)

  out = tmp_path / "tok"
  result = run("--vocab_size=300", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  tok = tokenizer_lib.get(str(out / "tokenizer.json"))
  assert (tok.vocab_size, tok.eos_id) == (300, 0)
  config = json.loads((out / "tokenizer_config.json").read_text())
  assert config["eos_token"] == "<|endoftext|>"
  # Trained on the train split only, as the fixture's is: the same file.
  assert (out / "tokenizer.json").read_bytes() == corpus["path"].read_bytes()
  bpt = float(regex.search(r"validation: ([\d.]+) bytes/token",
                           result.stdout)[1])
  assert bpt == pytest.approx(pipeline.load_tokens(
      corpus["builder"], "validation", tok).bytes_per_token, abs=1e-3)
  assert (f"--config.data.tokenizer={out / 'tokenizer.json'} "
          "--config.model.vocab_size=300") in result.stdout

  for extra, fragment in [
      (["--vocab_size=100", f"--out={tmp_path / 'x'}"],
       "--vocab_size=100 must be at least 257"),
      (["--vocab_size=300", f"--out={out}"], "already holds a tokenizer.json"),
      (["--vocab_size=300", f"--out={out / 'tokenizer.json'}"], "is a file")]:
    result = run(*extra)
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("error: ")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]
  assert run("--vocab_size=300", f"--out={out}",
             "--overwrite").returncode == 0
