"""Classification: an MLP on images (digits, MNIST) or a Transformer encoder
on text passages (Shakespeare genres).

Train batches: {"image": float32 B x H x W x C, "label": int32 B} or
{"tokens": int32 B x L, "label": int32 B}. Eval batches add "mask" (1 for real
rows, 0 for the padding that fills the last batch), so an eval covers the
whole test split exactly once. The eval step returns class probabilities; the
metrics (lm/metrics.py) are computed on the host from all of them.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm import checks, metrics, paths
from lm.data import genres, images, sources
from lm.tasks.supervised import Supervised

TEXT_DATASETS = ("shakespeare_genres",)
DATASETS = images.DATASETS + TEXT_DATASETS


def inputs_key(dataset: str) -> str:
  return "tokens" if dataset in TEXT_DATASETS else "image"


def make_data(config, share_index: int = 0, share_count: int = 1):
  dataset = config.data.dataset
  if dataset in images.DATASETS:
    return images.make(config, share_index, share_count)
  if dataset in TEXT_DATASETS:
    return genres.make(config, share_index, share_count)
  raise sources.DataError(f"config.data.dataset={dataset!r} is unknown; use "
                          f"one of {DATASETS}.")


class Classification(Supervised):
  name = "classify"
  MODELS = ("mlp", "transformer_classifier")
  EVAL_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "loss")

  def __init__(self, config):
    self.config = config
    self.key = inputs_key(config.data.dataset)
    self._source = None  # DP-SGD's (train examples, transform), once read.

  def check(self, model_cfg, mesh: dict[str, int]) -> None:
    config = self.config
    dataset = config.data.dataset
    checks.one_of(dataset, DATASETS, "config.data.dataset")
    text = dataset in TEXT_DATASETS
    want = "transformer_classifier" if text else "mlp"
    checks.require(config.model.name == want,
                   f"config.data.dataset={dataset!r} is classified by "
                   f"config.model.name={want!r}, not {config.model.name!r}.")
    num_classes = len(genres.GENRES) if text else images.NUM_CLASSES
    checks.require(
        model_cfg.num_classes == num_classes,
        f"config.model.num_classes={model_cfg.num_classes} differs from the "
        f"{num_classes} labels of config.data.dataset={dataset!r}; set "
        f"config.model.num_classes={num_classes}.")
    if text:
      genres.check(config, model_cfg)
      checks.require(not model_cfg.moe.experts,
                     "config.model.moe.experts > 0: mixture-of-experts layers "
                     "are for the LM (config.task='lm').")
      checks.require(mesh["expert"] == 1,
                     f"config.mesh.expert={mesh['expert']}: only the LM has "
                     "expert layers.")
    else:
      images.check(config, model_cfg)

  def check_teacher(self, teacher_config, teacher_cfg, model_cfg,
                    where: str) -> None:
    checks.require(
        teacher_config.data.dataset == self.config.data.dataset,
        f"{where}: the teacher classified {teacher_config.data.dataset!r}, "
        f"the student {self.config.data.dataset!r}; use a teacher of the "
        "same dataset.")
    checks.require(
        teacher_cfg.num_classes == model_cfg.num_classes,
        f"{where}: the teacher's model.num_classes={teacher_cfg.num_classes}"
        f" differs from the student's {model_cfg.num_classes}.")

  def model_flops_per_step(self, model_cfg) -> None:
    return None  # XLA's cost analysis counts them (lm/run/perf.py).

  def make_data(self, share_index: int = 0, share_count: int = 1):
    data = make_data(self.config, share_index, share_count)
    if self._poisson():  # DP-SGD: the sampling its accountant assumes.
      data.train = self._poisson_train(share_index, share_count)
    return data

  def _privacy_source(self):
    """(train examples, augmentation), read once: what DP-SGD samples."""
    if self._source is None:
      data = genres if self.key == "tokens" else images
      self._source = data.train_source(self.config)
    return self._source

  def batch_spec(self) -> dict:
    """The global train batch's shapes (tools that compile without data);
    DP-SGD's Poisson batches are padded, with a mask."""
    b, mask = self._padded_spec()
    if self.key == "tokens":
      inputs = jax.ShapeDtypeStruct((b, self.config.data.seq_len), jnp.int32)
    else:
      inputs = jax.ShapeDtypeStruct((b, *self.config.model.image_shape),
                                    jnp.float32)
    return {self.key: inputs, "label": jax.ShapeDtypeStruct((b,), jnp.int32),
            **mask}

  def throughput(self) -> tuple[str, int]:
    return "examples", self.config.train.batch_size

  def forward(self, model, batch: dict, key) -> tuple:
    """(logits B x C, labels B); dropout only when `key` is given."""
    return model(batch[self.key], dropout_key=key), batch["label"]

  def loss(self, model, batch: dict, key) -> tuple:
    logits_BxC, labels_B = self.forward(model, batch, key)
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC,
                                                           labels_B)
    accuracy = jnp.mean(jnp.argmax(logits_BxC, -1) == labels_B)
    return ce_B.mean(), {"accuracy": accuracy}

  def eval_step(self, model, batch: dict, eval_inputs=None) -> dict:
    del eval_inputs
    logits_BxC = model(batch[self.key])
    return {"probs": jax.nn.softmax(logits_BxC, axis=-1),
            "label": batch["label"], "mask": batch["mask"]}

  def summarize(self, outputs: list[dict], data, *, workdir: Path | None = None,
                step: int = 0) -> dict[str, float]:
    mask = np.concatenate([o["mask"] for o in outputs]) > 0
    probs_NxC = np.concatenate([o["probs"] for o in outputs])[mask]
    labels_N = np.concatenate([o["label"] for o in outputs])[mask]
    result = metrics.classification(labels_N, probs_NxC)
    picked = probs_NxC[np.arange(len(labels_N)), labels_N].astype(np.float64)
    result["loss"] = float(-np.mean(np.log(np.maximum(picked, 1e-30))))
    if data.train_class_counts is not None:  # Imbalanced: a baseline.
      baseline = genres.majority_baseline(labels_N, data.train_class_counts)
      result["majority_accuracy"] = baseline["accuracy"]
      result["majority_f1"] = baseline["macro_f1"]
    if workdir is not None and jax.process_index() == 0:
      names = list(data.class_names)
      cm = metrics.confusion_matrix(labels_N, probs_NxC.argmax(-1),
                                    probs_NxC.shape[1])
      path = paths.resolve(workdir) / "images" / f"confusion_{step:06d}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      metrics.save_confusion_png(
          cm, names, path,
          title=f"step {step}: accuracy {result['accuracy']:.3f}")
    return result
