"""What every task provides: the `Task` protocol the run layer calls.

A task is what a model is trained to do (lm, classify, gan). It owns its
data, its loss (or whole train step) and its evaluation; the loop
(lm/run/loop.py) is the same for all of them. Tasks are registered
explicitly in lm/tasks/__init__.py; nothing probes for optional methods.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol


class Task(Protocol):
  name: ClassVar[str]
  # The model families (lm/models) this task trains.
  MODELS: ClassVar[tuple[str, ...]]
  # The metrics every eval of this task logs (`summarize`'s keys): what a
  # sweep's objective may name (lm/sweep/spec.py checks it before any run).
  EVAL_METRICS: ClassVar[tuple[str, ...]]

  def check(self, model_cfg, mesh: dict[str, int]) -> None:
    """The task's own checks: its data section against the model, and what
    the task does not support. Raises lm.checks.ConfigError."""

  def check_teacher(self, teacher_config, teacher_cfg, model_cfg,
                    where: str) -> None:
    """Whether a distillation teacher (its resolved config and model
    Config) fits this student; raises ConfigError naming `where`."""

  def make_data(self, share_index: int = 0, share_count: int = 1) -> Any:
    """An object with .train (a checkpointable grain iterator of host-local
    batches) and .eval (a list of host-local batches): this process's share
    of every global batch, rows [i*B/n, (i+1)*B/n) for (i, n) =
    lm.parallel.mesh.batch_share."""

  def privacy_examples(self) -> int:
    """How many training examples DP-SGD samples from (its accountant's
    dataset size). Called only with config.privacy on, which lm/run/checks.py
    allows only for the tasks that implement it (classify, lm)."""

  def batch_spec(self) -> dict:
    """The global train batch's shapes (tools that compile without data)."""

  def throughput(self) -> tuple[str, int]:
    """(unit name, units per step), e.g. ("tokens", 8192)."""

  def model_flops_per_step(self, model_cfg) -> float | None:
    """Analytic training FLOPs of one step, or None: MFU then counts the
    FLOPs of XLA's cost analysis (lm/run/perf.py)."""

  def train_step(self, state, batch, *, setup, accum_steps: int = 1,
                 teacher=None) -> tuple[Any, dict]:
    """(state, batch) -> (state, metrics); pure."""

  def prepare_eval(self) -> Any:
    """Arrays the eval step needs besides the parameters (the GAN's feature
    classifier: loaded, or trained once and stored, here), or None. Called
    once, explicitly, before the first evaluation."""

  def eval_step(self, model, batch: dict, eval_inputs) -> dict:
    """Outputs of one eval batch (pure); `eval_inputs` is what
    `prepare_eval` returned."""

  def summarize(self, outputs: list[dict], data, *,
                workdir: Path | None = None, step: int = 0
                ) -> dict[str, float]:
    """Metrics from every eval batch's outputs, on the host (may write
    images into workdir)."""
