"""Next-token prediction on a text corpus.

A batch is {"tokens": int32 B x (L+1)}: inputs are tokens[:, :-1] and targets
tokens[:, 1:]; or, with config.data.packing=segments, a packed batch
(lm/data/packing.py: inputs, targets, positions, segment_ids, weights, each
B x L), whose loss is the weighted mean: padding (and, for SFT, the prompt)
carries no loss.

Context parallelism (mesh `sequence` = n > 1) feeds the model the sequence in
the zig-zag layout (lm/parallel/context.py): inputs, targets and positions
are permuted together, so each device's shard holds chunks i and 2n-1-i and
the causal work is balanced. The loss is a mean over tokens, so the order
does not change it.

A mixture-of-experts model adds its layers' weighted auxiliary losses
(router z-loss, load balancing) to the training loss and logs them with the
dropped-token fraction.

With DP-SGD (config.privacy) an example is one disjoint window of L+1
tokens of the training stream (lm/data/pipeline.py's PrivateWindows), each
step's batch a Poisson sample of them (lm/data/poisson.py), and an
example's loss its own mean token cross-entropy (a batch of one):
docs/privacy.md.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm import checks
from lm.data import pipeline, tokenizer as tokenizer_lib
from lm.models import attention, transformer
from lm.parallel import axis_size, context
from lm.tasks.supervised import Supervised
from lm.train import privacy

# The fields of a packed batch (lm/data/packing.py).
PACKED = ("inputs", "targets", "positions", "segment_ids", "weights")


def _fields(batch: dict) -> dict:
  """inputs, targets B x L and, for packed batches, positions, segment_ids
  and weights B x L (None for a concatenated batch)."""
  if "tokens" in batch:
    tokens_BxL1 = batch["tokens"]
    return {"inputs": tokens_BxL1[:, :-1], "targets": tokens_BxL1[:, 1:],
            "positions": None, "segment_ids": None, "weights": None}
  return {k: batch[k] for k in PACKED}


def _layout(batch: dict) -> dict:
  """The batch's fields in the layout the mesh wants: with context
  parallelism every per-token field is permuted to the zig-zag order, and
  positions are given (the ring's causal mask reads them)."""
  fields = _fields(batch)
  n = axis_size("sequence")
  if n == 1:
    return fields
  shape = fields["inputs"].shape
  perm_L = context.zigzag_permutation(shape[1], n)
  if fields["positions"] is None:
    fields["positions"] = jnp.broadcast_to(
        jnp.arange(shape[1], dtype=jnp.int32), shape)
  return {k: None if v is None else v[:, perm_L] for k, v in fields.items()}


def _logits_and_aux(model, batch: dict):
  """(logits B x L x V, the fields of `_layout`, MoE aux dict; {} for a
  dense model)."""
  fields = _layout(batch)
  kwargs = ({} if fields["segment_ids"] is None
            else {"segment_ids_BxL": fields["segment_ids"]})
  (logits_BxLxV, _), sown = nnx.capture(model, nnx.Intermediate)(
      fields["inputs"], fields["positions"], **kwargs)
  aux = {}
  for values in jax.tree.leaves(nnx.to_pure_dict(sown),
                                is_leaf=lambda x: isinstance(x, tuple)):
    aux.update(values[0])  # One Transformer, called once.
  return logits_BxLxV, fields, aux


def _token_losses(model, batch: dict):
  """(cross-entropy B x L, weights B x L or None, MoE aux)."""
  logits_BxLxV, fields, aux = _logits_and_aux(model, batch)
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV, fields["targets"])
  return ce_BxL, fields["weights"], aux


def lm_loss(model, batch: dict):
  """Mean next-token cross-entropy (float32) over the weighted tokens, the
  weight behind it, and MoE aux.

  A packed batch's mean divides by `batch["weight_norm"]` summed over its
  rows when present (`with_weight_norm`): the global batch's total weight,
  shared out per row, so that the microbatches of gradient accumulation and
  the shards of an explicit data-parallel reduction each divide by their
  share of one denominator, and their average is the global weighted
  mean."""
  ce_BxL, weights_BxL, aux = _token_losses(model, batch)
  if weights_BxL is None:
    return ce_BxL.mean(), jnp.asarray(ce_BxL.size, jnp.float32), aux
  total = jnp.sum(ce_BxL * weights_BxL)
  count = jnp.sum(weights_BxL)
  norm = batch["weight_norm"].sum() if "weight_norm" in batch else count
  return jnp.where(norm > 0, total / jnp.maximum(norm, 1e-9), 0.0), count, aux


def with_weight_norm(batch: dict) -> dict:
  """A packed global batch with each row's share of the total weight."""
  if "weights" not in batch:
    return batch
  weights_BxL = batch["weights"]
  rows = weights_BxL.shape[0]
  norm_B = jnp.broadcast_to(jnp.sum(weights_BxL) / rows, (rows,))
  return {**batch, "weight_norm": norm_B}


def check_packing(config, model_cfg) -> None:
  """What packed batches (segment ids) do not combine with."""
  if config.data.packing != "segments":
    return
  checks.require(
      attention.supports_segments(model_cfg.attention_impl),
      f"config.data.packing=segments needs attention that honours segment "
      f"ids; config.model.attention_impl={model_cfg.attention_impl!r} does "
      "not here. Use chunked or xla.")
  checks.require(
      not config.distill.teacher_workdir,
      "config.data.packing=segments with distillation is not supported: "
      "unset config.distill.teacher_workdir or use packing=concat.")


class LanguageModeling(Supervised):
  name = "lm"
  MODELS = ("transformer",)
  EVAL_METRICS = ("loss", "perplexity", "bits_per_byte")

  def __init__(self, config):
    self.config = config
    self._windows = None  # DP-SGD's examples, once read.

  def check(self, model_cfg, mesh: dict[str, int]) -> None:
    del mesh
    pipeline.check(self.config, model_cfg)
    check_packing(self.config, model_cfg)

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
    train = None  # DP-SGD: batches of its examples, the disjoint windows.
    if self._poisson():
      train = self._poisson_train(share_index, share_count)
    elif privacy.enabled(self.config.privacy):  # sampling=shuffle.
      windows = self._privacy_source()[0]
      train = pipeline.train_iterator(
          windows.tokens, length=windows.length,
          batch_size=self.config.train.batch_size, seed=self.config.seed,
          share_index=share_index, share_count=share_count,
          stride=windows.stride)
    return pipeline.make(self.config, share_index, share_count, train=train)

  def _privacy_source(self):
    """DP-SGD's examples: the disjoint windows of the training split."""
    if self._windows is None:
      self._windows = pipeline.private_windows(self.config)
    return self._windows, None

  def batch_spec(self) -> dict:
    """The global train batch's shapes (tools that compile without data);
    DP-SGD's Poisson batches are padded, with a mask."""
    rows, mask = self._padded_spec()
    length = pipeline.seq_len(self.config)
    if self.config.data.packing == "concat":
      return {"tokens": jax.ShapeDtypeStruct((rows, length + 1), jnp.int32),
              **mask}
    return {k: jax.ShapeDtypeStruct(
        (rows, length), jnp.float32 if k == "weights" else jnp.int32)
            for k in PACKED}

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
    logits_BxLxV, fields, _ = _logits_and_aux(model, batch)
    return logits_BxLxV, fields["targets"]

  def train_step(self, state, batch, *, setup, accum_steps: int = 1,
                 teacher=None):
    return super().train_step(state, with_weight_norm(batch), setup=setup,
                              accum_steps=accum_steps, teacher=teacher)

  @staticmethod
  def loss(model, batch: dict, key) -> tuple:
    del key
    loss, _, aux = lm_loss(model, batch)
    # The MoE auxiliary losses train the router; the logged "loss" is the
    # cross-entropy plus them, "ce" the cross-entropy alone.
    if aux:
      return loss + aux["moe_aux_loss"], {"ce": loss, **aux}
    return loss, {}

  @staticmethod
  def eval_step(model, batch: dict, eval_inputs=None) -> dict:
    """Sums (not means) so the host can aggregate over any number of batches."""
    del eval_inputs
    ce_BxL, weights_BxL, _ = _token_losses(model, batch)
    if weights_BxL is None:
      weights_BxL = jnp.ones_like(ce_BxL)
    return {"loss_sum": jnp.sum(ce_BxL * weights_BxL),
            "count": jnp.sum(weights_BxL)}

  @staticmethod
  def summarize(outputs: list[dict], data, *, workdir=None,
                step: int = 0) -> dict[str, float]:
    del workdir, step  # Writes no images.
    loss = (sum(float(o["loss_sum"]) for o in outputs)
            / sum(float(o["count"]) for o in outputs))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss / math.log(2) / data.eval_bytes_per_token}
