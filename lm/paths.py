"""Run and data directories: local paths or URIs such as gs://bucket/run.

Every workdir, checkpoint directory and data directory goes through
`resolve`, which returns an `etils.epath.Path`: local paths are made absolute
(with ~ expanded); URIs keep their scheme (pathlib would turn gs://b into
gs:/b). Orbax, tfds and TensorBoard read and write such paths themselves;
our own files (config.json, metrics.jsonl, PNGs) go through epath. On a
machine without TensorFlow, epath and TensorBoard reach GCS through fsspec:
`pip install gcsfs` there.
"""
from __future__ import annotations

import os

from etils import epath


def is_remote(path) -> bool:
  return "://" in os.fspath(path)


def resolve(path) -> epath.Path:
  path = os.fspath(path)
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(path)))
