"""Every registered task implements the whole Task protocol (the run layer
calls its methods without probing for them), and trains a registered model
family."""
import inspect

import pytest

from lm import models
from lm.tasks import TASKS
from lm.tasks.base import Task

METHODS = sorted(name for name, member in vars(Task).items()
                 if inspect.isfunction(member) and not name.startswith("_"))


def test_the_protocol_has_the_methods_the_loop_calls():
  assert {"check", "make_data", "train_step", "prepare_eval", "eval_step",
          "summarize", "throughput", "model_flops_per_step"} <= set(METHODS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_implements_the_protocol(name):
  cls = TASKS[name]
  missing = [m for m in METHODS if not callable(getattr(cls, m, None))]
  assert not missing, f"{name} lacks {missing}"
  for method in METHODS:  # Same parameters, by name, as the protocol's.
    want = list(inspect.signature(getattr(Task, method)).parameters)
    got = list(inspect.signature(getattr(cls, method)).parameters)
    if got and got[0] != "self":  # A staticmethod has no self.
      got = ["self", *got]
    assert got == want, (name, method, got, want)
  assert cls.name == name
  assert cls.MODELS and set(cls.MODELS) <= set(models.MODELS)
