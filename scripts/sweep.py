r"""Hyperparameter search with Optuna: every trial is a run directory.

python scripts/sweep.py --config=configs/mlp_digits.py \
    --sweep=configs/sweeps/mlp_digits.py --workdir=sweeps/mlp_digits

Trials run in WORKDIR/trial_K; the study lives in WORKDIR/study.db (or
--sweep.storage=postgresql+psycopg://..., shared by workers on several
machines: run the same command on each). Rerunning the command resumes: finished
trials are kept and a half-finished one continues from its checkpoint.
Results: WORKDIR/results.csv, results.json and plots/*.png (docs/sweeps.md).
Override the experiment with --config.x=y and the sweep with --sweep.x=y.
"""
from absl import flags, logging
from ml_collections import config_flags

from lm.run import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The experiment: a config file[:arg].")
_SWEEP = config_flags.DEFINE_config_file(
    "sweep", None, "The sweep: space, objective, budget, method "
    "(configs/sweeps/*.py).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The sweep's directory: the study and trial_K runs.")
_REPORT = flags.DEFINE_boolean(
    "report_only", False, "Rewrite results.csv/json and the plots from the "
    "study without running trials.")
flags.mark_flags_as_required(["config", "sweep", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO.
  from lm.sweep import runner, trial  # noqa: PLC0415 - after flags parse.
  try:
    runner.run(_CONFIG.value, _SWEEP.value, _WORKDIR.value,
               report_only=_REPORT.value)
  except trial.TrialInterrupted as e:  # SIGTERM / Ctrl-C: checkpointed.
    print(f"{e}; rerun the same command to resume the sweep.", flush=True)


if __name__ == "__main__":
  cli.run(main)
