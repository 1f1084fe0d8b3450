"""Tasks: what a model is trained to do. Each owns its data, its loss (or whole
train step) and its evaluation; the loop (lm/train/loop.py) is the same for
all of them.

A task object has:
  make_data(share_index, share_count) -> object with .train (a
      checkpointable grain iterator of host-local batches) and .eval (a list
      of host-local batches): this process's share of every global batch,
      rows [i*B/n, (i+1)*B/n) for (i, n) = lm.parallel.mesh.batch_share
  train_step(state, batch, *, setup, accum_steps) -> (state, metrics)  pure
  eval_step(model, batch) -> dict of arrays                            pure
  summarize(outputs, data, *, workdir, step) -> dict of floats  on the host,
      from every eval batch's outputs (gathered to the host)
  throughput(config) -> (unit name, units per step), e.g. ("tokens", 8192)
  model_flops_per_step(model_cfg) -> analytic FLOPs (optional; without it
      MFU counts the FLOPs of XLA's cost analysis)
"""
from __future__ import annotations

from lm.tasks import classify, gan, language

TASKS = {
    "lm": language.LanguageModeling,
    "classify": classify.Classification,
    "gan": gan.Gan,
}


def get(config):
  """The task named by config.task (default "lm")."""
  return TASKS[config.get("task", "lm")](config)
