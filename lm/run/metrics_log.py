"""Where metrics go: metrics.jsonl, TensorBoard event files, a progress line,
and the extra sinks a run asks for (Weights & Biases: lm/run/wandb_sink.py).

Only process 0 writes (multi-host safe). TensorBoard files are written with
the `tensorboard` package's own event writer, so no TensorFlow is needed.
On a local disk metrics.jsonl is appended to; an object store (gs://) has no
append, so there the whole file is rewritten at each write (it stays small:
one line per log interval).
"""
from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path

import jax
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from lm import paths


# Metrics worth a place on the progress line (all go to metrics.jsonl).
SHOWN = ("loss", "perplexity", "bits_per_byte", "accuracy", "f1", "d_loss",
         "g_loss", "cfid", "classifier_score", "loss_scale", "skipped_steps",
         "sparsity", "moe_dropped_fraction")


class MetricsLog:

  def __init__(self, workdir: str | Path, total_steps: int, *,
               append: bool | None = None, sinks=()):
    """`sinks`: more places for every record and eval image, each with
    write(step, split, metrics), images(step, {name: png bytes}),
    summary(split, metrics) and close()."""
    self.enabled = jax.process_index() == 0
    self.sinks = list(sinks) if self.enabled else []
    self.total_steps = total_steps
    self.start_time = time.time()
    self.start_step: int | None = None
    if self.enabled:
      workdir = paths.resolve(workdir)
      self.images_dir = workdir / "images"
      self.path = workdir / "metrics.jsonl"
      self.append = not paths.is_remote(workdir) if append is None else append
      if self.append:
        self.jsonl = self.path.open("a")
      else:  # Keep what a resumed run wrote before.
        self.lines = (self.path.read_text().splitlines(keepends=True)
                      if self.path.exists() else [])
      if not paths.is_remote(workdir):
        _tensorboard_without_tensorflow()
      self.tb = EventFileWriter(str(workdir / "tensorboard"))

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    line = json.dumps({"step": step, "split": split, **clean}) + "\n"
    if self.append:
      self.jsonl.write(line)
      self.jsonl.flush()
    else:
      self.lines.append(line)
      self.path.write_text("".join(self.lines))
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=v)
        for k, v in clean.items()])
    self.tb.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                      summary=summary))
    self.tb.flush()
    for sink in self.sinks:
      sink.write(step, split, clean)

  def summary(self, split: str, metrics: dict) -> None:
    """A run's final figures (not a step's record) for the sinks that keep
    such a summary (W&B's run summary)."""
    for sink in self.sinks:
      sink.summary(split, {k: float(v) for k, v in metrics.items()})

  def images(self, step: int) -> None:
    """The PNGs an eval at `step` wrote (WORKDIR/images/NAME_STEP.png: GAN
    samples, confusion matrices) to TensorBoard's images and the sinks."""
    if not self.enabled or not self.images_dir.exists():
      return
    suffix = f"_{step:06d}.png"
    pngs = {p.name.removesuffix(suffix): p.read_bytes()
            for p in sorted(self.images_dir.glob(f"*{suffix}"))}
    if not pngs:
      return
    values = []
    for name, png in pngs.items():
      width, height = _png_size(png)
      values.append(summary_pb2.Summary.Value(
          tag=f"images/{name}", image=summary_pb2.Summary.Image(
              height=height, width=width, encoded_image_string=png)))
    self.tb.add_event(event_pb2.Event(
        wall_time=time.time(), step=step,
        summary=summary_pb2.Summary(value=values)))
    self.tb.flush()
    for sink in self.sinks:
      sink.images(step, pngs)

  def progress(self, step: int, metrics: dict, split: str = "train") -> None:
    """One human-readable line: step, loss, throughput, ETA."""
    if not self.enabled:
      return
    if self.start_step is None:
      self.start_step, self.start_time = step, time.time()
    parts = [f"step {step:>6d}/{self.total_steps}", f"{split}"]
    parts += [f"{k} {v:.4g}" for k, v in metrics.items() if k in SHOWN]
    for key, unit in (("tokens_per_sec", "tok/s"),
                      ("examples_per_sec", "ex/s")):
      if key in metrics:
        parts.append(f"{metrics[key]:,.0f} {unit}")
    if "step_time_s" in metrics:
      parts.append(f"{1e3 * metrics['step_time_s']:,.0f} ms/step")
    if "mfu" in metrics and math.isfinite(metrics["mfu"]):
      parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    done = step - self.start_step
    if split == "train" and done > 0:
      eta = (time.time() - self.start_time) / done * (self.total_steps - step)
      parts.append(f"ETA {_duration(eta)}")
    print(" | ".join(parts), flush=True)

  def close(self) -> None:
    if self.enabled:
      if self.append:
        self.jsonl.close()
      self.tb.close()
      for sink in self.sinks:
        sink.close()


def _png_size(png: bytes) -> tuple[int, int]:
  """(width, height) from a PNG's IHDR chunk, which always comes first."""
  return (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))


def _tensorboard_without_tensorflow() -> None:
  """TensorBoard's event writer imports TensorFlow when it is installed
  (seconds of start-up) for tf.io.gfile alone; a local run directory needs
  none of it. A module `tensorboard.compat.notf` is TensorBoard's switch to
  its own TensorFlow stub (tensorboard/compat/__init__.py), which writes
  local files; it must be set before TensorBoard first resolves
  `tensorboard.compat.tf`. Remote directories keep tf.io.gfile where
  TensorFlow is installed (the stub reaches them through fsspec)."""
  sys.modules.setdefault("tensorboard.compat.notf",
                         types.ModuleType("tensorboard.compat.notf"))


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stdout, flush=True)
