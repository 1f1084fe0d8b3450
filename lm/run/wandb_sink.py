"""Weights & Biases as one more place a run's metrics go (config.log.wandb):
the resolved config, every record of metrics.jsonl (train, eval, sparsity,
time) and the eval images (GAN samples, confusion matrices).

- Offline by default (config.log.wandb_mode): wandb writes
  WORKDIR/wandb/offline-run-*/ and needs no network; `wandb sync` uploads it
  later. A gs:// workdir keeps wandb's files in $WANDB_DIR (else
  ~/.cache/lm/wandb), since wandb writes local files only.
- One W&B run per run directory: its id is kept in WORKDIR/wandb_run.json,
  and a resumed run continues it (resume="allow").
- The x axis is our step, logged as the metric `step` (define_metric),
  not wandb's own row counter: a run resumed from a checkpoint older than
  its last log line logs those steps again, which wandb's monotonic `step=`
  would drop.
- Only process 0 writes (`sinks` returns none elsewhere).
"""
from __future__ import annotations

import io
import json
import os
import secrets
import string

import jax

from lm import checks, config as config_lib, paths

RUN_FILE = "wandb_run.json"
MODES = ("offline", "online")
_INSTALL = "pip install wandb==0.31.0 (pinned in requirements.txt)"


def check(log_cfg) -> None:
  """config.log, by its owner: raises ConfigError naming the key and fix."""
  checks.require(isinstance(log_cfg.wandb, bool),
                 f"config.log.wandb={log_cfg.wandb!r} must be True or False.")
  checks.one_of(log_cfg.wandb_mode, MODES, "config.log.wandb_mode")
  if not log_cfg.wandb:
    # A key set for a run that would ignore it (design.md): most likely
    # W&B was meant to be on.
    defaults = config_lib.base().log
    changed = [k for k in log_cfg
               if k != "wandb" and _plain(log_cfg[k]) != _plain(defaults[k])]
    checks.require(not changed,
                   f"config.log.{changed[0] if changed else ''} is set but "
                   "config.log.wandb=False does not use it; add "
                   "--config.log.wandb=True (or drop the override).")
    return
  try:
    import wandb  # noqa: F401, PLC0415 - seconds of imports, only if on.
  except ImportError:
    raise checks.ConfigError(
        "config.log.wandb=True needs the wandb package, which is not "
        f"installed: {_INSTALL}, or set config.log.wandb=False.") from None


def _plain(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def sinks(config, workdir) -> list:
  """The extra sinks of a run: a WandbSink on process 0 if asked for."""
  if config.log.wandb and jax.process_index() == 0:
    return [WandbSink(config, workdir)]
  return []


def run_id(workdir) -> str | None:
  """The W&B run id this run directory logs to, if it has one."""
  path = paths.resolve(workdir) / RUN_FILE
  return json.loads(path.read_text())["id"] if path.exists() else None


class WandbSink:

  def __init__(self, config, workdir):
    import wandb  # noqa: PLC0415 - see `check`.
    self._wandb = wandb
    workdir = paths.resolve(workdir)
    c = config.log
    run = run_id(workdir)
    if run is None:  # Written before init: a crash in it keeps the id.
      # As wandb's own ids: 8 of [a-z0-9].
      run = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                    for _ in range(8))
      tmp = workdir / f"{RUN_FILE}.tmp"
      tmp.write_text(json.dumps({"id": run, "project": c.wandb_project}))
      tmp.replace(workdir / RUN_FILE)
    local = str(workdir)
    if paths.is_remote(workdir):
      local = (os.environ.get("WANDB_DIR")
               or os.path.expanduser("~/.cache/lm/wandb"))
    os.makedirs(local, exist_ok=True)
    try:
      self.run = wandb.init(
          project=c.wandb_project, entity=c.wandb_entity or None,
          name=c.wandb_name or workdir.name, tags=list(c.wandb_tags),
          id=run, resume="allow", dir=local, mode=c.wandb_mode,
          # The console stays ours (the progress line); wandb's copy of it
          # would wrap sys.stdout for the whole run.
          settings=wandb.Settings(console="off"))
    except Exception as e:  # noqa: BLE001 - wandb raises many kinds.
      raise checks.UserError(
          f"config.log.wandb: W&B could not start run {run} "
          f"({type(e).__name__}: {str(e).strip().splitlines()[0]}). Online "
          "needs `wandb login` (or WANDB_API_KEY) and the network; "
          "--config.log.wandb_mode=offline needs neither.") from e
    # A resumed run may change a value (more steps): allowed, and shown.
    self.run.config.update(config.to_dict(), allow_val_change=True)
    self.run.define_metric("step")
    self._defined = set()

  def _axis(self, section: str) -> None:
    if section not in self._defined:
      self.run.define_metric(f"{section}/*", step_metric="step")
      self._defined.add(section)

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    self._axis(split)
    self.run.log({"step": step,
                  **{f"{split}/{k}": v for k, v in metrics.items()}})

  def images(self, step: int, images: dict[str, bytes]) -> None:
    """PNG files' bytes by name (`samples`, `confusion`)."""
    from PIL import Image  # noqa: PLC0415
    self._axis("images")
    self.run.log({"step": step, **{
        f"images/{name}": self._wandb.Image(
            Image.open(io.BytesIO(png)), caption=f"{name} at step {step}")
        for name, png in images.items()}})

  def summary(self, split: str, metrics: dict[str, float]) -> None:
    self.run.summary.update({f"{split}/{k}": v for k, v in metrics.items()})

  def close(self) -> None:
    self.run.finish()
