"""A sweep, start to end: check everything, open the study, run trials
until the budget is spent (with any other workers of the study), write
the results. Rerunning the same command resumes it."""
from __future__ import annotations

import json
from typing import Callable

from lm import checks, paths
from lm.run.metrics_log import log as default_log
from lm.sweep import checks as sweep_checks, report, spec, study as study_lib
from lm.sweep import trial as trial_lib


def run(config, sweep, workdir, *, report_only: bool = False,
        log: Callable[[str], None] = default_log) -> dict:
  """Runs (or resumes, or joins) the sweep in `workdir`; returns what
  WORKDIR/results.json holds."""
  sweep, config, params = sweep_checks.check(sweep, config)
  workdir = paths.resolve(workdir)
  checks.require(not paths.is_remote(workdir) or bool(sweep.storage),
                 f"--workdir={workdir}: the default study database is a "
                 "SQLite file in the workdir, which needs a local disk; set "
                 "sweep.storage to a database URL (postgresql+psycopg://...).")
  checks.require(not workdir.exists() or workdir.is_dir(),
                 f"--workdir={workdir} is a file; give a directory.")
  workdir.mkdir(parents=True, exist_ok=True)
  identity = _plain({"method": sweep.method, "seed": sweep.seed,
                     "space": sweep.space.to_dict(),
                     "objective": sweep.objective.to_dict(),
                     "config": config.to_dict()})
  study = study_lib.open_study(sweep, params, workdir, identity=identity)
  (workdir / "sweep.json").write_text(json.dumps(
      _plain({"sweep": sweep.to_dict(), "config": config.to_dict()}),
      indent=2, sort_keys=True) + "\n")
  metric = sweep.objective.metric
  if not report_only:
    trials = sweep.budget.trials or spec.grid_size(params)
    log(f"study {study.study_name!r} in "
        f"{study_lib.storage_url(sweep, workdir).split('@')[-1]}: "
        f"{sweep.method}, {trials} trials, {sweep.objective.direction} "
        f"eval {metric}, pruner {sweep.pruner.name}")
    study_lib.work(
        study, trial_lib.objective(config, sweep, params, workdir, log),
        trials=trials, minutes=sweep.budget.minutes,
        poll_s=sweep.heartbeat_s, log=log,
        after=lambda: report.write(study, workdir, metric=metric, log=log))
  results = report.write(study, workdir, metric=metric, log=log)
  best = results["best"]
  if best:
    log(f"best: trial {best['trial']} {metric} {best['value']:.4g} "
        f"({best['run_dir']}) | {workdir / 'results.csv'}")
  return results


def _plain(value):
  """JSON's view of a value (tuples are lists): what the study stores."""
  return json.loads(json.dumps(value, default=str))
