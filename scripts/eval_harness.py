r"""Evaluates a run with EleutherAI's lm-evaluation-harness.

python scripts/eval_harness.py --workdir=runs/tiny \
    --tasks=shakespeare_next_line,shakespeare_rolling [--limit=100]

Any harness task works where its data is available (--include_path adds a
folder of task YAMLs); hub datasets are not reachable offline, so the two
local tasks above are built from the held-out Shakespeare plays
(lm/interop/harness_tasks.py) into --tasks_dir. Results go to stdout (the
harness's table) and WORKDIR/eval_harness.json.
"""
from absl import flags, logging

from lm.run import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_TASKS = flags.DEFINE_list("tasks", ["shakespeare_next_line",
                                     "shakespeare_rolling"], "Harness tasks.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Documents per task (0 = all).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.")
_TASKS_DIR = flags.DEFINE_string("tasks_dir", "", "Where the local tasks are "
                                 "built; default: under the data dir.")
_INCLUDE = flags.DEFINE_string("include_path", "", "Another folder of task "
                               "YAMLs.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh to restore onto; default: "
                            "the training mesh if it fits, else FSDP.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import json  # noqa: PLC0415
  import os  # noqa: PLC0415
  from pathlib import Path  # noqa: PLC0415
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

  import lm_eval  # noqa: PLC0415
  from lm_eval.utils import make_table  # noqa: PLC0415

  from lm import paths  # noqa: PLC0415
  from lm.data import pipeline  # noqa: PLC0415
  from lm.interop import harness, harness_tasks  # noqa: PLC0415

  model = harness.HarnessLM(_WORKDIR.value, _MESH.value, _BATCH.value)
  tasks_dir = Path(_TASKS_DIR.value or pipeline.data_dir(
      model.config.data) / "harness_tasks")
  if any(t in harness_tasks.TASKS for t in _TASKS.value):
    corpus = model.config.data.copy_and_resolve_references()
    with corpus.unlocked():
      corpus.corpus, corpus.text_dir = "shakespeare", ""
    harness_tasks.build(corpus, tasks_dir)
  include = [str(tasks_dir)] + ([_INCLUDE.value] if _INCLUDE.value else [])
  # torch_random_seed=None: the model is ours, so the harness need not import
  # torch (where it is installed) to seed a generator nothing reads.
  results = lm_eval.simple_evaluate(
      model=model, tasks=_TASKS.value,
      task_manager=harness_tasks.task_manager(_TASKS.value, include),
      limit=_LIMIT.value or None, log_samples=False, torch_random_seed=None)
  print(make_table(results))
  (paths.resolve(_WORKDIR.value) / "eval_harness.json").write_text(
      json.dumps(results["results"], indent=1, default=str) + "\n")


if __name__ == "__main__":
  cli.run(main)
