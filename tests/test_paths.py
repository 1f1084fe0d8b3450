"""Workdirs and data dirs may be URIs (gs://...): they keep their scheme, and
metrics.jsonl is written the same way with or without append support."""
import os
import subprocess
import sys

import ml_collections

from conftest import BASE_XLA_FLAGS
from lm import paths
from lm.data import pipeline
from lm.run.metrics_log import MetricsLog


def test_uris_keep_their_scheme_and_local_paths_become_absolute(
    monkeypatch, tmp_path):
  run = paths.resolve("gs://bucket/runs/lm")
  assert os.fspath(run / "checkpoints") == "gs://bucket/runs/lm/checkpoints"
  assert paths.is_remote(run) and not paths.is_remote(tmp_path)
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve("runs/x")) == str(tmp_path / "runs" / "x")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert os.fspath(paths.resolve("~/d")) == str(tmp_path / "d")
  data = ml_collections.ConfigDict(dict(data_dir="gs://bucket/tfds"))
  assert os.fspath(pipeline.data_dir(data)) == "gs://bucket/tfds"


def test_metrics_file_is_the_same_when_rewritten_instead_of_appended(
    tmp_path):
  files = []
  for append in (True, False):
    workdir = tmp_path / str(append)
    workdir.mkdir()
    for start in (1, 3):  # A run, then its resumption in the same workdir.
      log = MetricsLog(workdir, 4, append=append)
      for step in (start, start + 1):
        log.write(step, "train", {"loss": 1.0 / step})
      log.close()
    files.append((workdir / "metrics.jsonl").read_text())
  assert files[0] == files[1]
  assert len(files[0].splitlines()) == 4


def test_tensorboard_events_of_a_local_run_need_no_tensorflow(tmp_path):
  """TensorFlow is installed beside the tests (the SavedModel export): the
  event writer must still not import it (seconds of start-up in every
  training process) for a local run directory, and the events read back."""
  code = f"""
import sys
from lm.run.metrics_log import MetricsLog
log = MetricsLog({str(tmp_path)!r}, 2)
log.write(1, "train", {{"loss": 0.5}})
log.write(2, "train", {{"loss": 0.25}})
log.close()
from tensorboard.backend.event_processing import event_accumulator
acc = event_accumulator.EventAccumulator({str(tmp_path / "tensorboard")!r})
acc.Reload()
print([(s.step, s.value) for s in acc.Scalars("train/loss")])
print("tensorflow" in sys.modules)
"""
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=300, env=dict(
                           os.environ, XLA_FLAGS=BASE_XLA_FLAGS))
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines() == ["[(1, 0.5), (2, 0.25)]", "False"]
