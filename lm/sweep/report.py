"""A sweep's results: one row per slot (trial run directory) in
WORKDIR/results.csv and WORKDIR/results.json, and PNG plots in
WORKDIR/plots/: the best value so far over trials, parallel coordinates of
the parameters against the objective, and the parameters' importances
(Optuna's fANOVA, seeded). Any worker rewrites them after each trial, from
the database, atomically."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from lm.sweep import study as study_lib

PLOTS = ("best_so_far", "parallel_coordinates", "importances")


def rows(study: optuna.Study) -> list[dict]:
  """One row per slot, from its latest attempt, in slot order."""
  latest: dict[int, optuna.trial.FrozenTrial] = {}
  attempts: dict[int, int] = {}
  for t in study.get_trials(deepcopy=False):
    if t.user_attrs.get(study_lib.OVER_BUDGET):
      continue
    slot = study_lib.slot_of(t)
    attempts[slot] = attempts.get(slot, 0) + 1
    if slot not in latest or t.number > latest[slot].number:
      latest[slot] = t
  names = sorted({k for t in latest.values() for k in t.params})
  out = []
  for slot in sorted(latest):
    t = latest[slot]
    ended = t.datetime_complete and t.datetime_start
    out.append({
        "trial": slot, "state": t.state.name,
        "value": t.value,  # None unless COMPLETE.
        **{name: t.params.get(name) for name in names},
        "last_step": max(t.intermediate_values, default=None),
        "attempts": attempts[slot],
        "seconds": ((t.datetime_complete - t.datetime_start).total_seconds()
                    if ended else None),
        "run_dir": t.user_attrs.get("run_dir", "")})
  return out


def importances(study: optuna.Study) -> dict[str, float]:
  """fANOVA importances over the completed trials ({} with fewer than two,
  or when no parameter varies)."""
  done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  if len(done) < 2:
    return {}
  try:
    return dict(optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))
  except (ValueError, RuntimeError):  # No variation to attribute.
    return {}


def write(study: optuna.Study, workdir, *, metric: str,
          log: Callable[[str], None] = print) -> dict:
  """Writes the table and plots; returns what results.json holds."""
  workdir = Path(workdir)
  table = rows(study)
  done = [r for r in table if r["state"] == "COMPLETE"]
  pick = min if study.direction.name == "MINIMIZE" else max
  best = pick(done, key=lambda r: r["value"]) if done else None
  values = [r["value"] if r["state"] == "COMPLETE" else math.nan
            for r in table]
  curve = [None if math.isnan(v) else v for v in study_lib.best_so_far(
      values, study.direction.name.lower())]
  results = {
      "study": study.study_name, "metric": metric,
      "direction": study.direction.name.lower(),
      "best": best, "importances": importances(study),
      "best_so_far": curve,
      "trials": table}
  _atomic(workdir / "results.json", json.dumps(
      results, indent=2, default=str) + "\n")
  buffer = io.StringIO()
  if table:
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
  _atomic(workdir / "results.csv", buffer.getvalue())
  _plots(study, workdir / "plots", metric, log)
  return results


def _plots(study: optuna.Study, folder: Path, metric: str,
           log: Callable[[str], None]) -> None:
  import matplotlib  # noqa: PLC0415 - only a sweep's report draws.
  matplotlib.use("Agg")  # Files only: never a window.
  import matplotlib.pyplot as plt  # noqa: PLC0415
  from optuna.visualization import matplotlib as plots  # noqa: PLC0415
  done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
  if not done:
    return
  folder.mkdir(parents=True, exist_ok=True)
  draw = {
      "best_so_far": lambda: plots.plot_optimization_history(
          study, target_name=metric),
      "parallel_coordinates": lambda: plots.plot_parallel_coordinate(
          study, target_name=metric),
      "importances": lambda: plots.plot_param_importances(
          study, evaluator=optuna.importance.FanovaImportanceEvaluator(
              seed=0), target_name=metric)}
  for name in PLOTS:
    if name == "importances" and len(done) < 2:
      continue  # fANOVA needs two finished trials.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      # A parameter with one value so far has a flat axis: fine.
      warnings.filterwarnings("ignore", "Attempting to set identical")
      try:
        axes = draw[name]()
      except (ValueError, RuntimeError) as e:
        log(f"plots/{name}.png: not drawn ({e})")
        continue
    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    figure.set_size_inches(8, 5)
    tmp = folder / f".{name}.{os.getpid()}.png"
    figure.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(figure)
    tmp.replace(folder / f"{name}.png")


def _atomic(path: Path, text: str) -> None:
  """Several workers write the same files: each write is whole."""
  tmp = path.with_name(f".{path.name}.{os.getpid()}")
  tmp.write_text(text)
  tmp.replace(path)
