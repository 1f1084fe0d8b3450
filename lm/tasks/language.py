"""Next-token prediction on a text corpus.

A batch is {"tokens": int32 B x (L+1)}: inputs are tokens[:, :-1] and targets
tokens[:, 1:].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lm.data import pipeline
from lm.tasks.supervised import Supervised


def lm_loss(model, tokens_BxL1):
  """Mean next-token cross-entropy (float32) and the token count."""
  logits_BxLxV, _ = model(tokens_BxL1[:, :-1])
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV, tokens_BxL1[:, 1:])
  return ce_BxL.mean(), ce_BxL.size


class LanguageModeling(Supervised):
  name = "lm"

  def __init__(self, config):
    self.config = config

  def make_data(self, process_index: int = 0, process_count: int = 1):
    return pipeline.make(self.config, process_index, process_count)

  def batch_spec(self) -> dict:
    """The global train batch's shapes (tools that compile without data)."""
    return {"tokens": jax.ShapeDtypeStruct(
        (self.config.train.batch_size, pipeline.seq_len(self.config) + 1),
        jnp.int32)}

  def throughput(self) -> tuple[str, int]:
    return "tokens", self.config.train.batch_size * pipeline.seq_len(
        self.config)

  @staticmethod
  def forward(model, batch: dict, key) -> tuple:
    """(next-token logits B x L x V, targets B x L)."""
    del key  # Deterministic: no dropout in the LM.
    tokens_BxL1 = batch["tokens"]
    logits_BxLxV, _ = model(tokens_BxL1[:, :-1])
    return logits_BxLxV, tokens_BxL1[:, 1:]

  @staticmethod
  def loss(model, batch: dict, key) -> tuple:
    del key
    return lm_loss(model, batch["tokens"])[0], {}

  @staticmethod
  def eval_step(model, batch: dict) -> dict:
    """Sums (not means) so the host can aggregate over any number of batches."""
    loss, count = lm_loss(model, batch["tokens"])
    return {"loss_sum": loss * count, "count": jnp.asarray(count, jnp.float32)}

  @staticmethod
  def summarize(outputs: list[dict], data, **unused) -> dict[str, float]:
    loss = (sum(float(o["loss_sum"]) for o in outputs)
            / sum(float(o["count"]) for o in outputs))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss / math.log(2) / data.eval_bytes_per_token}
