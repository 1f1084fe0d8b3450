"""Tasks: what a model is trained to do. Each owns its data, its loss (or
whole train step) and its evaluation, behind the `Task` protocol
(lm/tasks/base.py); the loop (lm/run/loop.py) is the same for all of them."""
from __future__ import annotations

from lm import checks
from lm.tasks import classify, gan, language, sft
from lm.tasks.base import Task

TASKS = {
    "lm": language.LanguageModeling,
    "classify": classify.Classification,
    "gan": gan.Gan,
    "sft": sft.FineTuning,
}


def get(config) -> Task:
  """The task named by config.task, for a resolved config."""
  checks.one_of(config.task, TASKS, "config.task")
  return TASKS[config.task](config)
