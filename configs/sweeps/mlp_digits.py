r"""The MLP on digits: learning rate, weight decay, width and dropout,
by TPE, maximizing test accuracy; median pruning on the evals.

python scripts/sweep.py --config=configs/mlp_digits.py \
    --sweep=configs/sweeps/mlp_digits.py --workdir=sweeps/mlp_digits

Every sweep key and its default: lm/sweep/spec.py; the space's forms:
lm/sweep/space.py. A grid instead: --sweep.method=grid needs explicit
values for the ranges (points=N or step=S).
"""
import ml_collections

from lm.sweep import spec


def get_config() -> ml_collections.ConfigDict:
  s = spec.base()
  s.method = "tpe"
  s.space = dict(
      optimizer=dict(
          learning_rate=dict(low=1e-4, high=1e-2, log=True),
          weight_decay=dict(low=1e-6, high=1e-2, log=True)),
      model=dict(width=dict(choices=(64, 128, 256)),
                 dropout=dict(low=0.0, high=0.3)))
  s.objective = dict(metric="accuracy", direction="maximize")
  s.budget = dict(trials=20, minutes=0.0)
  # The config evaluates every 500 of 1500 steps: trials below the median
  # of the others at step 500 or 1000 stop there.
  s.pruner = dict(name="median", startup_trials=4)
  return s
