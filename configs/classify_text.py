r"""Transformer encoder classifier: which genre (comedy, history, tragedy,
poetry) a 256-byte Shakespeare passage comes from. Whole works are held out:
no work is in both train and test.

python scripts/train.py --config=configs/classify_text.py --workdir=runs/genres

Eval lines also hold majority_accuracy / majority_f1: always predicting the
most frequent training genre, the baseline to beat. Every key and its
default: lm/config.py (the model's: lm/models/transformer_classifier.py).
"""
import ml_collections

from lm import config as base_config

# Quantized and pruned: every block projection; the embedding and the class
# head stay float.
LAYERS = (r".*blocks/(\d+/)?(attn/[qkvo]|mlp/(gate|up|down))",)


def get_config() -> ml_collections.ConfigDict:
  c = base_config.base("transformer_classifier")
  c.model.update(num_classes=4, pool="mean", vocab_size=256, d_model=128,
                 n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256, mlp="gelu",
                 max_len=256)
  c.optimizer.update(
      name="adamw", learning_rate=1e-3, schedule="cosine", warmup_steps=50,
      end_learning_rate_fraction=0.05, b1=0.9, b2=0.98, weight_decay=0.05,
      grad_clip_norm=1.0)
  # The eval covers every test passage (eval_batches unused).
  c.train.update(steps=600, batch_size=32, log_every=50, eval_every=300,
                 eval_batches=1, checkpoint_every=300, max_checkpoints=2)
  c.data.update(dataset="shakespeare_genres", tokenizer="byte",
                seq_len=256,  # Bytes per passage (<= model.max_len).
                balance_classes=True)  # Sample the genres equally.
  c.quant.layers = LAYERS
  c.prune.layers = tuple(f"{p}/kernel" for p in LAYERS)
  return c
