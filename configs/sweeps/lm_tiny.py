r"""The tiny LM: peak learning rate, warmup and weight decay, by TPE,
minimizing the validation loss; median pruning on the evals (every 100 of
the 400 steps).

python scripts/sweep.py --config=configs/lm.py:tiny \
    --sweep=configs/sweeps/lm_tiny.py --workdir=sweeps/lm_tiny

Every sweep key and its default: lm/sweep/spec.py.
"""
import ml_collections

from lm.sweep import spec


def get_config() -> ml_collections.ConfigDict:
  s = spec.base()
  s.method = "tpe"
  s.space = dict(optimizer=dict(
      learning_rate=dict(low=3e-4, high=1e-2, log=True),
      warmup_steps=dict(low=0, high=100, step=10),
      weight_decay=dict(low=0.0, high=0.2)))
  s.objective = dict(metric="loss", direction="minimize")
  s.budget = dict(trials=16, minutes=0.0)
  s.pruner = dict(name="median", startup_trials=4)
  return s
