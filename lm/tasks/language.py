"""Next-token prediction on a text corpus.

A batch is {"tokens": int32 B x (L+1)}: inputs are tokens[:, :-1] and targets
tokens[:, 1:].

Context parallelism (mesh `sequence` = n > 1) feeds the model the sequence in
the zig-zag layout (lm/parallel/context.py): inputs, targets and positions
are permuted together, so each device's shard holds chunks i and 2n-1-i and
the causal work is balanced. The loss is a mean over tokens, so the order
does not change it.

A mixture-of-experts model adds its layers' weighted auxiliary losses
(router z-loss, load balancing) to the training loss and logs them with the
dropped-token fraction.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm import checks
from lm.data import pipeline, tokenizer as tokenizer_lib
from lm.models import transformer
from lm.parallel import axis_size, context
from lm.tasks.supervised import Supervised


def _layout(tokens_BxL1):
  """(inputs, targets, positions or None) in the layout the mesh wants."""
  inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
  n = axis_size("sequence")
  if n == 1:
    return inputs_BxL, targets_BxL, None
  perm_L = context.zigzag_permutation(inputs_BxL.shape[1], n)
  positions_BxL = jnp.broadcast_to(jnp.asarray(perm_L, jnp.int32),
                                   inputs_BxL.shape)
  return inputs_BxL[:, perm_L], targets_BxL[:, perm_L], positions_BxL


def _logits_and_aux(model, tokens_BxL1):
  """(logits B x L x V, targets B x L, MoE aux dict; {} for a dense model)."""
  inputs_BxL, targets_BxL, positions_BxL = _layout(tokens_BxL1)
  (logits_BxLxV, _), sown = nnx.capture(model, nnx.Intermediate)(
      inputs_BxL, positions_BxL)
  aux = {}
  for values in jax.tree.leaves(nnx.to_pure_dict(sown),
                                is_leaf=lambda x: isinstance(x, tuple)):
    aux.update(values[0])  # One Transformer, called once.
  return logits_BxLxV, targets_BxL, aux


def lm_loss(model, tokens_BxL1):
  """Mean next-token cross-entropy (float32), the token count, MoE aux."""
  logits_BxLxV, targets_BxL, aux = _logits_and_aux(model, tokens_BxL1)
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV, targets_BxL)
  return ce_BxL.mean(), ce_BxL.size, aux


class LanguageModeling(Supervised):
  name = "lm"
  MODELS = ("transformer",)

  def __init__(self, config):
    self.config = config

  def check(self, model_cfg, mesh: dict[str, int]) -> None:
    del mesh
    pipeline.check(self.config, model_cfg)

  def check_teacher(self, teacher_config, teacher_cfg, model_cfg,
                    where: str) -> None:
    checks.require(
        teacher_cfg.vocab_size == model_cfg.vocab_size,
        f"{where}: the teacher's model.vocab_size={teacher_cfg.vocab_size} "
        f"differs from the student's {model_cfg.vocab_size}; their logits "
        "must cover the same vocabulary. Use a teacher trained with the same "
        "tokenizer and vocab_size.")
    checks.require(
        tokenizer_lib.same(teacher_config.data.tokenizer,
                           self.config.data.tokenizer),
        f"{where}: the teacher's data.tokenizer="
        f"{teacher_config.data.tokenizer!r} differs from the student's "
        f"{self.config.data.tokenizer!r}.")
    length = pipeline.seq_len(self.config)
    checks.require(
        teacher_cfg.max_len >= length,
        f"{where}: the teacher's model.max_len={teacher_cfg.max_len} is "
        f"shorter than the student's training windows ({length} tokens); "
        "lower config.data.seq_len.")

  def make_data(self, share_index: int = 0, share_count: int = 1):
    return pipeline.make(self.config, share_index, share_count)

  def batch_spec(self) -> dict:
    """The global train batch's shapes (tools that compile without data)."""
    return {"tokens": jax.ShapeDtypeStruct(
        (self.config.train.batch_size, pipeline.seq_len(self.config) + 1),
        jnp.int32)}

  def throughput(self) -> tuple[str, int]:
    return "tokens", self.config.train.batch_size * pipeline.seq_len(
        self.config)

  def model_flops_per_step(self, model_cfg) -> float:
    """Analytic training FLOPs of one step (lm/run/perf.py's MFU)."""
    _, tokens = self.throughput()
    return transformer.flops_per_token(model_cfg,
                                       pipeline.seq_len(self.config)) * tokens

  @staticmethod
  def forward(model, batch: dict, key) -> tuple:
    """(next-token logits B x L x V, targets B x L)."""
    del key  # Deterministic: no dropout in the LM.
    logits_BxLxV, targets_BxL, _ = _logits_and_aux(model, batch["tokens"])
    return logits_BxLxV, targets_BxL

  @staticmethod
  def loss(model, batch: dict, key) -> tuple:
    del key
    loss, _, aux = lm_loss(model, batch["tokens"])
    # The MoE auxiliary losses train the router; the logged "loss" is the
    # cross-entropy plus them, "ce" the cross-entropy alone.
    if aux:
      return loss + aux["moe_aux_loss"], {"ce": loss, **aux}
    return loss, {}

  @staticmethod
  def eval_step(model, batch: dict, eval_inputs=None) -> dict:
    """Sums (not means) so the host can aggregate over any number of batches."""
    del eval_inputs
    loss, count, _ = lm_loss(model, batch["tokens"])
    return {"loss_sum": loss * count, "count": jnp.asarray(count, jnp.float32)}

  @staticmethod
  def summarize(outputs: list[dict], data, *, workdir=None,
                step: int = 0) -> dict[str, float]:
    del workdir, step  # Writes no images.
    loss = (sum(float(o["loss_sum"]) for o in outputs)
            / sum(float(o["count"]) for o in outputs))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss / math.log(2) / data.eval_bytes_per_token}
