"""What the tasks trained on labels (lm, classify) share: the train step.

A task defines `loss(model, batch, key)` and `forward(model, batch, key) ->
(logits, labels)`; with a distillation teacher (lm/train/distill.py) the loss
is built from `forward` instead.
"""
from __future__ import annotations

from lm.train import distill, step as step_lib


class Supervised:

  def train_step(self, state, batch, *, setup, accum_steps: int = 1,
                 teacher=None):
    loss_fn = self.loss if teacher is None else distill.loss_fn(
        self.forward, *teacher, self.config.distill)
    return step_lib.supervised_train_step(state, batch, setup=setup,
                                          loss_fn=loss_fn,
                                          accum_steps=accum_steps)

  def prepare_eval(self) -> None:
    return None  # The eval step needs only the parameters.
