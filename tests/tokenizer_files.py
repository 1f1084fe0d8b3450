"""Real tokenizer files from PyPI packages, fetched with pip at test time
(never committed): Mistral's 32k SentencePiece model (the mistral-common
wheel) and GPT-2's BPE ranks (the openai-whisper sdist), the latter also
as a tokenizer.json. Used by tests/data and tests/interop."""
import base64
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from conftest import REPO
from lm.data import pipeline, sources, tokenizer_json

# (requirement, file pip downloads, the tokenizer file inside it).
MISTRAL = ("mistral-common==1.13.1", "mistral_common-1.13.1-py3-none-any.whl",
           "mistral_common/data/tokenizer.model.v1")
WHISPER = ("openai-whisper==20250625", "openai_whisper-20250625.tar.gz",
           "openai_whisper-20250625/whisper/assets/gpt2.tiktoken")
def _cache_root() -> Path:
  root = os.environ.get("LM_TEST_DATA_DIR") or os.path.join(REPO, ".test_data")
  return Path(root) / "downloads" / "tokenizers"


def _extract(archive: Path, member: str, out: Path) -> None:
  if archive.name.endswith(".whl"):
    data = zipfile.ZipFile(archive).read(member)
  else:
    with tarfile.open(archive) as tar:
      data = tar.extractfile(member).read()
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".tmp").write_bytes(data)
  out.with_suffix(".tmp").replace(out)


def gpt2_ranks(path: Path) -> dict[bytes, int]:
  """tiktoken's format: base64 token, rank, one a line."""
  ranks = {}
  for line in path.read_text().splitlines():
    token, rank = line.split()
    ranks[base64.b64decode(token)] = int(rank)
  return ranks


def _gpt2_tokenizer_json(ranks: dict[bytes, int], path: Path) -> None:
  """GPT-2 as a tokenizer.json: tiktoken merges the adjacent pair whose
  concatenation ranks lowest, so every split of a token is a merge ranked
  by the token's rank. <|endoftext|> (50256) is its only special token; no
  tokenizer_config.json, so eos is found by name."""
  chars = tokenizer_json.byte_to_unicode()
  text = lambda b: "".join(chars[x] for x in b)  # noqa: E731
  merges = sorted((rank, k, text(t[:k]), text(t[k:]))
                  for t, rank in ranks.items() for k in range(1, len(t))
                  if t[:k] in ranks and t[k:] in ranks)
  tok = tokenizers.Tokenizer(models.BPE(
      vocab={text(t): rank for t, rank in ranks.items()},
      merges=[(a, b) for *_, a, b in merges]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>"])
  path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(path.with_suffix(".tmp")))
  path.with_suffix(".tmp").replace(path)


@pytest.fixture(scope="session")
def real_files():
  """The real tokenizer files, fetched with pip once for every session
  (and xdist worker): never committed, never fetched twice."""
  root = _cache_root()
  files = {"mistral": root / "mistral" / "mistral.model",
           "gpt2_ranks": root / "gpt2" / "gpt2.tiktoken",
           "gpt2": root / "gpt2" / "tokenizer.json"}
  with pipeline.file_lock(root / ".fetch.lock"):
    for (requirement, filename, member), key in ((MISTRAL, "mistral"),
                                                 (WHISPER, "gpt2_ranks")):
      if not files[key].exists():
        archive = sources.pip_fetch(requirement, filename, root / "pip",
                                    "or copy it there by hand.")
        _extract(archive, member, files[key])
    if not files["gpt2"].exists():
      _gpt2_tokenizer_json(gpt2_ranks(files["gpt2_ranks"]), files["gpt2"])
  return files


