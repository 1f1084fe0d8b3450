"""What the tasks trained on labels (lm, classify) share: the train step,
and DP-SGD's Poisson-sampled batches.

A task defines `loss(model, batch, key)` and `forward(model, batch, key) ->
(logits, labels)`; with a distillation teacher (lm/train/distill.py) the loss
is built from `forward` instead. A task that trains privately also defines
`_privacy_source()`: its fixed enumeration of training examples (random
access to {name: array}) and a transform (augmentation) or None; the loss of
a batch of one of them is that example's loss (lm/train/privacy.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lm import checks
from lm.data import poisson
from lm.parallel import mesh as mesh_lib
from lm.train import distill, privacy, step as step_lib


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
    """The training examples DP-SGD samples from (the accountant's N)."""
    return len(self._privacy_source()[0])

  def _privacy_source(self):
    """(examples, transform or None): only the tasks that train privately
    define it; lm/run/checks.py refuses privacy for the others before this
    could be asked."""
    raise checks.ConfigError(
        f"config.privacy (DP-SGD) with config.task={self.name!r} is not "
        "supported; train the classifiers (config.task='classify') or the LM "
        "(config.task='lm') privately.")

  def _poisson(self) -> bool:
    """Whether the train batches are DP-SGD's Poisson samples."""
    c = self.config.privacy
    return privacy.enabled(c) and c.sampling == "poisson"

  def _poisson_train(self, share_index: int = 0, share_count: int = 1):
    """Endless Poisson-sampled padded batches of `_privacy_source()`'s
    examples, with a "mask": the sampling the accountant assumes."""
    source, transform = self._privacy_source()
    return poisson.train_iterator(
        source, rate=self.config.train.batch_size / len(source),
        rows=self._padded_rows(share_count) // share_count,
        seed=self.config.seed, share_index=share_index,
        share_count=share_count, transform=transform)

  def _padded_rows(self, share_count: int = 1) -> int:
    """Global rows of a padded Poisson batch: a multiple of the batch
    shards x accumulation steps (lm/data/poisson.py)."""
    config = self.config
    mesh = mesh_lib.check(config.mesh, jax.device_count(),
                          jax.process_count())
    unit = mesh_lib.batch_divisor(mesh) * config.train.grad_accum_steps
    n = self.privacy_examples()
    return poisson.padded_rows(n, config.train.batch_size / n,
                               config.train.steps, unit, share_count)

  def _padded_spec(self) -> tuple[int, dict]:
    """(global rows, {"mask": spec} or {}) of a train batch: DP-SGD's
    Poisson batches are padded and masked, the others batch_size rows."""
    if self._poisson():
      b = self._padded_rows()
      return b, {"mask": jax.ShapeDtypeStruct((b,), jnp.float32)}
    return self.config.train.batch_size, {}
