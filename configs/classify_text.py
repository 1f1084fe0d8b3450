r"""Transformer encoder classifier: which genre (comedy, history, tragedy,
poetry) a 256-byte Shakespeare passage comes from. Whole works are held out:
no work is in both train and test.

python scripts/train.py --config=configs/classify_text.py --workdir=runs/genres

Eval lines also hold majority_accuracy / majority_f1: always predicting the
most frequent training genre, the baseline to beat.
"""
import ml_collections

from configs import compression


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "classify"
  c.model = dict(
      name="transformer_classifier",  # The LM's blocks, bidirectional.
      num_classes=4,
      pool="mean",  # mean | first.
      vocab_size=256,  # Bytes.
      d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256, mlp="gelu",
      max_len=256)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.precision = dict(compute_dtype="float32", param_dtype="float32")
  c.optimizer = dict(
      name="adamw", learning_rate=1e-3, schedule="cosine", warmup_steps=50,
      end_learning_rate_fraction=0.05, b1=0.9, b2=0.98, weight_decay=0.05,
      grad_clip_norm=1.0)
  c.train = dict(
      steps=600,
      batch_size=32,
      grad_accum_steps=1,
      log_every=50,
      eval_every=300,
      eval_batches=1,  # Unused: the eval covers every test passage.
      checkpoint_every=300,
      max_checkpoints=2)
  c.data = dict(
      dataset="shakespeare_genres",
      data_dir="",
      tokenizer="byte",
      seq_len=256,  # Passage length in bytes (<= model.max_len).
      balance_classes=True)  # Sample the four genres equally in training.
  # QAT / distillation / pruning, all off by default (configs/compression.py):
  # every block projection; the embedding and the class head stay float.
  c.update(compression.defaults(
      layers=(r".*blocks/(\d+/)?(attn/[qkvo]|mlp/(gate|up|down))",)))
  return c
