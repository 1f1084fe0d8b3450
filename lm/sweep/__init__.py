"""Hyperparameter sweeps: Optuna studies whose trials are whole runs (the
run layer's loop), each an ordinary run directory. Above the run layer.

space.py   the searched config keys and their values
spec.py    the sweep config: every key and its default (no JAX)
checks.py  the sweep config against the experiment's config
study.py   the study in its database; the worker loop (slots, budget,
           retries of killed trials); knows nothing of training
trial.py   one trial: a run with the trial's values, reporting its evals
report.py  results.csv / results.json and the PNG plots
runner.py  all of it, for scripts/sweep.py
"""
