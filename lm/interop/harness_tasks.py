"""Local lm-evaluation-harness tasks from the held-out Shakespeare plays
(the corpus's test split), built offline: hub datasets are not reachable.

  shakespeare_next_line  multiple choice: after three lines of a play,
                         which of four lines comes next (the true one and
                         three from elsewhere in the held-out plays); acc.
  shakespeare_rolling    rolling log-likelihood of ~1,000-character
                         passages: word and byte perplexity, bits per byte.

Each task is a YAML file that names a JSON Lines file beside it; the
harness reads them with `task_manager(tasks, [DIR])`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lm.data import pipeline

TASKS = ("shakespeare_next_line", "shakespeare_rolling")
_NEXT_LINE = """task: shakespeare_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
_ROLLING = """task: shakespeare_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def _lines(text: str) -> list[str]:
  return [line.strip() for line in text.splitlines() if len(line.strip()) > 8]


def build(data_cfg, out_dir: Path, *, items: int = 200, passages: int = 20,
          seed: int = 0) -> Path:
  """Writes both tasks into `out_dir` (from the corpus config.data names)
  and returns it."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  source = pipeline.prepare(data_cfg).as_data_source(split="test")
  texts = [source[i]["text"] for i in range(len(source))]
  texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
  rng = np.random.default_rng(seed)
  lines = [_lines(t) for t in texts]
  pool = [line for doc in lines for line in doc]
  next_line = []
  while len(next_line) < items:
    doc = lines[rng.integers(len(lines))]
    i = int(rng.integers(3, len(doc) - 1))
    true = doc[i]
    others = [pool[j] for j in rng.choice(len(pool), 3, replace=False)
              if pool[j] != true]
    if len(others) < 3:
      continue
    choices = [true, *others]
    order = rng.permutation(4)
    next_line.append({"context": "\n".join(doc[i - 3:i]) + "\n",
                      "choices": [choices[k] for k in order],
                      "label": int(np.argmin(order))})
  rolling = []
  for k in range(passages):
    text = texts[k % len(texts)]
    start = int(rng.integers(0, max(1, len(text) - 1000)))
    rolling.append({"text": text[start:start + 1000]})
  for name, rows, template in (("shakespeare_next_line", next_line, _NEXT_LINE),
                               ("shakespeare_rolling", rolling, _ROLLING)):
    data = out_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out_dir / f"{name}.yaml").write_text(template.format(data=data))
  return out_dir


def task_manager(tasks: list[str], include: list[str]):
  """The harness's TaskManager for `tasks`, indexing only the `include`
  folders when they hold every one: the harness's own ~14,000 task YAMLs take
  about 6 s of CPU to index on each start, and are indexed only when a task
  is not found locally (a harness task, or a YAML file's path)."""
  from lm_eval.tasks import TaskManager  # noqa: PLC0415

  local = TaskManager(include_path=include, include_defaults=False)
  if set(tasks) <= set(local.all_tasks):
    return local
  return TaskManager(include_path=include)
