"""The sweep config against a real experiment config (the MLP on digits):
what it refuses, with the key and the fix, before anything is written; and
the eval metrics each task declares are the ones it logs."""
import importlib.util
import types

import numpy as np
import pytest

from configs import mlp_digits
from lm.checks import ConfigError
from lm.sweep import checks as sweep_checks, runner
from lm.tasks import TASKS

SPACE = dict(optimizer=dict(learning_rate=dict(low=1e-4, high=1e-2,
                                                log=True)))


def _sweep(**values):
  return {"method": "random", "budget": dict(trials=2), "space": SPACE,
          "objective": dict(metric="accuracy", direction="maximize"),
          **values}


@pytest.mark.parametrize("sweep, message", [
    (_sweep(objective=dict(metric="acc", direction="maximize")),
     "sweep.objective.metric='acc': task classify does not log it in its "
     "evals; did you mean 'accuracy'? its eval metrics: accuracy, precision,"
     " recall, f1, roc_auc, loss."),
    (_sweep(space=dict(optimizer=dict(learnig_rate=dict(low=1e-4,
                                                        high=1e-2)))),
     "sweep.space.optimizer.learnig_rate: config.optimizer.learnig_rate is "
     "not a key of the config; did you mean optimizer.learning_rate?"),
    (_sweep(space=dict(optimizer=dict(warmup_steps=dict(low=0,
                                                        high=5000)))),
     "sweep.space.optimizer.warmup_steps: the value 5000 makes an invalid "
     "config: config.optimizer.warmup_steps"),
    (_sweep(method="bayes"), "sweep.method='bayes' is unknown"),
    (_sweep(budget=dict(trials=0)), "sweep.budget.trials=0: "
     "sweep.method=random needs a number of trials"),
])
def test_a_bad_sweep_stops_before_anything_is_written(sweep, message,
                                                      tmp_path):
  with pytest.raises(ConfigError) as e:
    runner.run(mlp_digits.get_config(), sweep, tmp_path / "sweep")
  assert message in str(e.value)
  assert not (tmp_path / "sweep").exists()


def test_pruning_needs_intermediate_evals():
  config = mlp_digits.get_config()
  config.train.eval_every = config.train.steps
  with pytest.raises(ConfigError, match="sweep.pruner.name=median prunes on "
                     "intermediate evals"):
    sweep_checks.check(_sweep(), config)


def test_gp_without_torch_says_what_to_install(monkeypatch):
  find = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      None if name == "torch" else find(name, *a)))
  with pytest.raises(ConfigError, match="sweep.method=gp: Optuna's GPSampler "
                     "needs torch.*pip install torch") as e:
    sweep_checks.check(_sweep(method="gp"), mlp_digits.get_config())
  assert "\n" not in str(e.value)


def test_each_task_logs_the_eval_metrics_it_declares():
  """What summarize returns (the eval line) holds every declared metric:
  a sweep's objective is checked against the declaration."""
  rng = np.random.default_rng(0)
  lm_outputs = [{"loss_sum": 20.0, "count": 10.0}]
  data = types.SimpleNamespace(eval_bytes_per_token=1.0,
                               train_class_counts=None, class_names=list(
                                   "0123456789"))
  probs = rng.dirichlet(np.ones(10), 40)
  gan_outputs = [{"fake": rng.uniform(size=(40, 8, 8, 1)),
                  "fake_feats": rng.normal(size=(40, 4)),
                  "real_feats": rng.normal(size=(40, 4)),
                  "fake_probs": probs, "mask": np.ones(40)}]
  classify_outputs = [{"probs": probs, "label": np.arange(40) % 10,
                       "mask": np.ones(40)}]
  outputs = {"lm": lm_outputs, "sft": lm_outputs, "gan": gan_outputs,
             "classify": classify_outputs}
  assert set(outputs) == set(TASKS)
  for name, task in TASKS.items():
    instance = object.__new__(task)  # summarize reads no config.
    logged = instance.summarize(outputs[name], data)
    assert set(task.EVAL_METRICS) <= set(logged), name
