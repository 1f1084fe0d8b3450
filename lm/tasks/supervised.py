"""What the tasks trained on labels (lm, classify) share: the train step.

A task defines `loss(model, batch, key)` and `forward(model, batch, key) ->
(logits, labels)`; with a distillation teacher (lm/train/distill.py) the loss
is built from `forward` instead.
"""
from __future__ import annotations

from lm import checks
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

  def privacy_examples(self) -> int:
    """DP-SGD's dataset size: only the classifiers sample examples
    (Classification overrides this); lm/run/checks.py refuses privacy for
    the others before this could be asked."""
    raise checks.ConfigError(
        f"config.privacy (DP-SGD) with config.task={self.name!r} is not "
        "supported; train the classifiers (config.task='classify') privately.")
