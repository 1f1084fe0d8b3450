"""A pure-Python stand-in for training: the sweeps of tests/sweep run it in
this process or in worker processes (which need no JAX: this module imports
only the light part of lm.sweep)."""
from lm.sweep import space as space_lib, spec, study as study_lib

# A stand-in for a config: the keys a space may name, with their types.
CONFIG = {"optimizer": {"learning_rate": 1e-3, "warmup_steps": 0,
                        "name": "adamw"},
          "model": {"width": 32}}
# 3 x 2 points: geometric points, and a step that stops short of high.
GRID = dict(optimizer=dict(
    learning_rate=dict(low=1e-4, high=1e-2, points=3, log=True),
    warmup_steps=dict(low=0, high=15, step=10)))


def sweep(method, space, trials=0, seed=0, storage=""):
  """(the resolved sweep config, its searched keys)."""
  s = spec.resolve(dict(method=method, space=space, seed=seed,
                        budget=dict(trials=trials), pruner=dict(name="none"),
                        heartbeat_s=1, stale_after_s=2, startup_trials=2,
                        storage=storage))
  return s, space_lib.parse(s.space, CONFIG, method)


def quadratic(params, method):
  """A cheap objective with a known minimum, called as a sweep calls a
  trial: (trial, slot) -> value."""
  def objective(trial, slot):
    values = {p.key: space_lib.suggest(trial, p, method) for p in params}
    trial.set_user_attr("slot", slot)
    lr = values.get("optimizer.learning_rate", 1e-3)
    return (lr - 3e-3) ** 2 + values.get("optimizer.warmup_steps", 0) / 1e3
  return objective


def run(folder, method, space, trials=0, seed=0):
  """A whole sweep of `quadratic` by one worker; the study."""
  s, params = sweep(method, space, trials, seed)
  study = study_lib.open_study(s, params, folder, identity={})
  study_lib.work(study, quadratic(params, method),
                 trials=trials or spec.grid_size(params), log=lambda _: None)
  return study
