"""Tracking and profiling (docs/tracking.md): the W&B sink, the profile
window and the time breakdown, read back with the tools' own readers: wandb's
record schema for its offline transaction log, XLA's XSpace reader
(jax.profiler.ProfileData) for the trace, TensorBoard's event loader."""
import glob
import io
import json
import struct
import sys
import threading
import time

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import _gan_mlp, tiny_config
from lm.checks import ConfigError, UserError
from lm import cpu
from lm.run import goodput, loop, profiler, wandb_sink
from lm.run.metrics_log import MetricsLog


def _gan_config(data_dir):
  """The small GAN: 4 steps, logs at 2 and 4, one eval (samples) at 4;
  the profile window is steps 1 and 2, across the resume after step 2."""
  c = _gan_mlp()
  c.data.data_dir = data_dir
  c.mesh = dict(data=-1)
  c.train.update(steps=4, batch_size=16, log_every=2, eval_every=4,
                 checkpoint_every=0, profile_steps=(1, 3))
  c.log.wandb = True
  return c


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory, data_dir):
  """(workdir, [(seconds, WORKDIR/time.json after it) for each attempt]):
  the GAN trained with W&B and a profile window in two attempts (stopped
  after step 2, then resumed)."""
  workdir = tmp_path_factory.mktemp("tracking") / "gan"
  attempts = []
  for stop in (2, None):
    start = time.monotonic()
    loop.train(_gan_config(data_dir), workdir, stop_at_step=stop)
    attempts.append((time.monotonic() - start, json.loads(
        (workdir / goodput.FILE).read_text())))
  return workdir, attempts


def _records(workdir, split):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["split"] == split]


def _wandb_log(path):
  """The records of a wandb transaction log (run-ID.wandb), parsed with
  wandb's own protobuf schema. The framing is LevelDB's log format, as
  wandb writes it: a 7-byte file header (':W&B', magic 0xBEE1, version 0),
  then 32 KiB blocks of chunks, each (crc32, length, type) + data, a record
  being a FULL chunk or FIRST, MIDDLE..., LAST."""
  from wandb.proto import wandb_internal_pb2  # noqa: PLC0415
  data = open(path, "rb").read()
  assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
  block, pos, pending, out = 32768, 7, b"", []
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:  # Too short for a chunk header: padding.
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:  # Zeros to the end of the block.
      pos += left
      continue
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # FULL, LAST.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
      pending = b""
  return out


def test_wandb_offline_run_has_the_config_metrics_and_samples_and_resumes(
    gan_run):
  """One W&B run id for the run directory, continued by the resumed
  attempt (two offline logs of that id); its config is config.json; every
  train, eval and time record of metrics.jsonl is in its history at our
  step, and its summary ends with time.json's totals; the eval's sample grid
  is its image."""
  workdir, _ = gan_run
  run_id = json.loads((workdir / wandb_sink.RUN_FILE).read_text())["id"]
  logs = sorted(glob.glob(str(workdir / "wandb" / f"offline-run-*-{run_id}"
                              / f"run-{run_id}.wandb")))
  assert len(logs) == 2, glob.glob(str(workdir / "wandb" / "*"))
  config, rows = {}, []
  for path in logs:
    records = _wandb_log(path)
    runs = [r.run for r in records if r.HasField("run")]
    assert [r.run_id for r in runs] == [run_id]
    for r in records:
      if r.HasField("config"):
        config.update({i.key: json.loads(i.value_json)
                       for i in r.config.update})
      if r.HasField("history"):
        rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in r.history.item})
  want = json.loads((workdir / "config.json").read_text())
  assert {k: v for k, v in config.items() if not k.startswith("_")} == want
  # The resumed attempt's log (the last one read) ends with the summary.
  summary = {i.key: json.loads(i.value_json) for r in records
             if r.HasField("summary") for i in r.summary.update}
  final = json.loads((workdir / goodput.FILE).read_text())
  assert summary["time/wall_s"] == final["wall_s"]  # The run's last word.
  for split, key in (("train", "loss"), ("train", "g_loss"),
                     ("eval", "cfid"), ("time", "wall_s")):
    ours = [(r["step"], r[key]) for r in _records(workdir, split)]
    theirs = [(row["step"], row[f"{split}/{key}"]) for row in rows
              if f"{split}/{key}" in row]
    assert theirs == ours and ours, (split, key)
  image, = [row for row in rows if "images/samples/path" in row]
  assert image["step"] == 4 and image["images/samples/format"] == "png"
  stored = glob.glob(str(workdir / "wandb" / "offline-run-*" / "files"
                         / image["images/samples/path"]))
  assert len(stored) == 1
  ours = Image.open(workdir / "images" / "samples_000004.png")
  np.testing.assert_array_equal(np.asarray(Image.open(stored[0])),
                                np.asarray(ours))


def test_profile_trace_holds_the_window_steps_across_the_resume(gan_run):
  """profile_steps=(1, 3) over a run stopped after step 2: the first
  attempt traced step 1, the resumed one step 2, and no other step; the
  breakdown's phases are named in the trace."""
  workdir, _ = gan_run
  from jax.profiler import ProfileData  # noqa: PLC0415
  sessions = sorted(glob.glob(str(workdir / "tensorboard" / "plugins"
                                  / "profile" / "*" / "*.xplane.pb")))
  steps, phases = [], set()
  for path in sessions:
    events = [e for plane in ProfileData.from_file(path).planes
              for line in plane.lines for e in line.events]
    steps.append(sorted(dict(e.stats)["step_num"] for e in events
                        if e.name == "train"))
    phases |= {e.name for e in events} & set(goodput.PARTS)
  assert steps == [[1], [2]]
  assert {"step", "data"} <= phases


@pytest.mark.parametrize("libtpu_profiler", [True, False])
def test_a_cpu_trace_beside_libtpus_profiler_says_how_to_avoid_it(
    tmp_path, monkeypatch, capsys, libtpu_profiler):
  """Only where libtpu's profiler would run beside a CPU computation
  (lm/cpu.libtpu_profiler_on_cpu) does the trace's start say so."""
  monkeypatch.setattr(cpu, "libtpu_profiler_on_cpu", lambda: libtpu_profiler)
  window = profiler.Window((0, 1), tmp_path)
  with window.step(0):
    jax.block_until_ready(jax.numpy.ones(3) * 2)
  window.after(1)
  out = capsys.readouterr().out
  assert ("JAX_PLATFORMS=cpu" in out) is libtpu_profiler, out
  assert "profile of 1 step(s)" in out


def test_time_breakdown_adds_up_and_continues_across_the_resume(gan_run):
  """A `time` record in metrics.jsonl at each log line, the totals in
  time.json at the end of each attempt: the parts add up to wall_s, none
  is negative, the totals only grow and carry over the resume (attempts
  1, then 2), and each attempt's share is within the wall time the test
  measured around it."""
  workdir, ((seconds_1, first), (seconds_2, last)) = gan_run
  logged = _records(workdir, goodput.SPLIT)
  assert [(r["step"], r["attempts"]) for r in logged] == [(2, 1), (4, 2)]
  records = [logged[0], first, logged[1], last]
  assert (first["step"], first["attempts"], last["step"],
          last["attempts"]) == (2, 1, 4, 2)
  parts = [f"{p}_s" for p in goodput.PARTS]
  for r in records:
    assert sum(r[p] for p in parts) == pytest.approx(r["wall_s"], rel=1e-9)
    assert min(r[p] for p in parts) >= 0, r
    assert r["goodput"] == pytest.approx(r["step_s"] / r["wall_s"])
  for before, after in zip(records, records[1:]):
    assert all(after[p] >= before[p] for p in parts + ["wall_s"])
  assert first["wall_s"] <= seconds_1
  assert last["wall_s"] - first["wall_s"] <= seconds_2
  for part in ("compile", "step", "data", "checkpoint", "startup"):
    assert first[f"{part}_s"] > 0, part
  assert first["eval_s"] == 0 < last["eval_s"]  # The eval ran at step 4.
  assert last["checkpoint_s"] > first["checkpoint_s"]  # Restore, save.


def test_tensorboard_gets_the_eval_images(gan_run):
  """TensorBoard's own event loader (which hands its dashboards image
  summaries as [width, height, PNG] tensors of the images plugin) finds the
  sample grid at the eval's step, the same PNG as WORKDIR/images/."""
  from tensorboard.backend.event_processing import (  # noqa: PLC0415
      event_file_loader)
  workdir, _ = gan_run
  found = []
  for path in sorted(glob.glob(str(workdir / "tensorboard" / "events.*"))):
    for event in event_file_loader.EventFileLoader(path).Load():
      found += [(event.step, v.metadata.plugin_data.plugin_name,
                 list(v.tensor.string_val))
                for v in event.summary.value if v.tag == "images/samples"]
  (step, plugin, (width, height, image)), = found
  png = (workdir / "images" / "samples_000004.png").read_bytes()
  assert (step, plugin, image) == (4, "images", png)
  assert (int(width), int(height)) == Image.open(io.BytesIO(png)).size


def _compile_listener(store):
  def listen(event, duration, **kwargs):
    if event in goodput.COMPILE_EVENTS:
      store.append(duration)
  return listen


def test_compile_time_moves_out_of_the_phase_that_compiled():
  """A fresh jit compiled inside `step` counts as compile, by JAX's own
  compile events (heard by a listener of the test's); a compile on another
  thread meanwhile is not this loop's."""
  heard = []
  listen = _compile_listener(heard)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    with goodput.Breakdown() as timer:
      start = time.monotonic()
      with timer.phase("step"):
        jax.jit(lambda x: jax.numpy.sin(x) * 3 + 1)(np.ones(5, np.float32))
      elapsed = time.monotonic() - start
      ours = sum(heard)
      with timer.phase("data"):
        other = threading.Thread(
            target=lambda: jax.jit(lambda x: x - 7)(np.ones(3)))
        other.start()
        other.join()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert ours > 0 and sum(heard) > ours  # The thread compiled too.
  assert timer.seconds["compile"] == pytest.approx(ours, rel=1e-9)
  assert 0 <= timer.seconds["step"] <= elapsed - ours + 1e-6
  assert timer.seconds["data"] > 0


def test_nested_phases_count_once_and_startup_turns_idle_after_a_step():
  """Time goes to the innermost phase; outside every phase it is startup
  until the first step and idle after it; the parts add up to the wall
  time the test measures around them."""
  start = time.monotonic()
  with goodput.Breakdown() as timer:
    time.sleep(0.02)
    outer = time.monotonic()
    with timer.phase("eval"):
      time.sleep(0.02)
      with timer.phase("step"):
        time.sleep(0.02)
    outer = time.monotonic() - outer
    time.sleep(0.02)
  record = timer.record()
  wall = time.monotonic() - start
  assert min(timer.seconds[p] for p in ("startup", "eval", "step",
                                        "idle")) >= 0.02
  assert timer.seconds["eval"] + timer.seconds["step"] <= outer
  assert record["wall_s"] <= wall
  assert record["attempts"] == 1


def test_a_resume_continues_the_totals_of_time_json(tmp_path):
  (tmp_path / goodput.FILE).write_text(json.dumps(
      {"step": 3, "step_s": 2.0, "idle_s": 3.0, "wall_s": 5.0,
       "attempts": 2}))
  resumed, fresh, lost = (goodput.Breakdown() for _ in range(3))
  resumed.open(tmp_path, resumed=True)
  fresh.open(tmp_path, resumed=False)  # A new run in the directory.
  lost.open(tmp_path / "x", resumed=True)  # An attempt that left no file.
  record = resumed.record()
  assert record["attempts"] == 3 and record["step_s"] == 2.0
  assert record["idle_s"] == 3.0 and record["wall_s"] >= 5.0
  assert fresh.record()["attempts"] == 1 and fresh.record()["wall_s"] < 5.0
  assert lost.record()["attempts"] == 2
  resumed.save(4)
  assert json.loads((tmp_path / goodput.FILE).read_text())["step"] == 4


BAD = [
    ({"train.profile_steps": (2, 5)},
     r"config\.train\.profile_steps=\(2, 5\) must be a \(start, stop\) pair "
     r"of steps with 0 <= start < stop <= config\.train\.steps=3"),
    ({"train.profile_steps": (2, 2)}, r"config\.train\.profile_steps=\(2, 2\)"),
    ({"train.profile_steps": (1,)}, r"config\.train\.profile_steps=\(1,\)"),
    ({"log.wandb_mode": "cloud"}, r"config\.log\.wandb_mode='cloud' is "
     r"unknown; use one of \['offline', 'online'\]"),
    ({"log.wandb_project": "mine"}, r"config\.log\.wandb_project is set but "
     r"config\.log\.wandb=False does not use it; add --config\.log\.wandb="
     r"True"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m for _, m in BAD])
def test_bad_tracking_config_stops_before_anything_runs(
    tmp_path, data_dir, overrides, message):
  with pytest.raises(ConfigError, match=message):
    loop.train(tiny_config(data_dir, mesh=dict(data=-1), **overrides),
               tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_wandb_asked_for_without_the_package_says_how_to_install_it(
    tmp_path, data_dir, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails.
  with pytest.raises(ConfigError, match=r"config\.log\.wandb=True needs the "
                     r"wandb package.*pip install wandb==.*or set "
                     r"config\.log\.wandb=False"):
    loop.train(tiny_config(data_dir, mesh=dict(data=-1), **{"log.wandb": True}),
               tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_wandb_run_that_cannot_start_is_one_line_naming_the_fix(
    tmp_path, monkeypatch):
  """Online without a login (wandb raises; faked here, the tests never try
  the network): a UserError of one line that says how to log in or go
  offline. The run id is kept for the next try."""
  import wandb  # noqa: PLC0415

  def init(**kwargs):
    assert kwargs["mode"] == "online" and kwargs["resume"] == "allow"
    raise wandb.errors.UsageError("api_key not configured (no-tty).\nmore")
  monkeypatch.setattr(wandb, "init", init)
  config = tiny_config(**{"log.wandb": True, "log.wandb_mode": "online"})
  with pytest.raises(UserError) as error:
    wandb_sink.WandbSink(config, tmp_path)
  message = str(error.value)
  run_id = wandb_sink.run_id(tmp_path)
  assert "\n" not in message and f"W&B could not start run {run_id}" in message
  assert "api_key not configured" in message and "wandb login" in message
  assert "--config.log.wandb_mode=offline" in message


def test_only_process_0_writes_to_wandb(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert wandb_sink.sinks(tiny_config(**{"log.wandb": True}), tmp_path) == []
  assert MetricsLog(tmp_path, 3, sinks=[object()]).sinks == []
  assert list(tmp_path.iterdir()) == []
