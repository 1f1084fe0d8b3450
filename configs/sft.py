r"""Supervised fine-tuning of a trained (or imported) LM on prompt/response
records: the loss on the response tokens only, records packed with segment
ids (lm/tasks/sft.py, lm/data/sft.py).

python scripts/train.py --config=configs/sft.py:tiny --workdir=runs/sft \
  --config.train.init_from=runs/tiny

Presets (the part after the colon):
  tiny   the tiny Shakespeare LM (configs/lm.py:tiny) fine-tuned on
         shakespeare_dialogue (a speech and the next speaker -> the next
         speech, built offline from the plays).
Your own data: --config.data.sft.train=train.jsonl
--config.data.sft.eval=eval.jsonl (docs/finetuning.md has the format).
"""
import ml_collections

from configs import lm


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  if size not in ("tiny",):
    raise ValueError(f"configs/sft.py:{size} is unknown; use tiny.")
  c = lm.get_config(size)
  c.task = "sft"
  c.data.packing = "segments"
  c.data.sft.update(train="shakespeare_dialogue", eval="shakespeare_dialogue")
  # Fine-tuning: a lower rate, a short warmup and no weight decay
  # (the defaults scripts/import_hf.py writes too).
  c.optimizer.update(learning_rate=1e-3, warmup_steps=10, schedule="cosine",
                     end_learning_rate_fraction=0.1, weight_decay=0.0,
                     grad_clip_norm=1.0)
  c.train.update(steps=150, batch_size=32, eval_every=50, eval_batches=4,
                 checkpoint_every=50)
  return c
