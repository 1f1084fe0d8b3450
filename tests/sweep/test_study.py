"""The study and its worker loop with a pure-Python objective (no
training): the grid, seeded samplers (the Gaussian process too), the
wall-clock budget, two workers on one SQLite or PostgreSQL study, and the
sweep config's checks."""
import itertools
import os
import subprocess
import sys
import textwrap
import time
import types

import optuna
import pytest

import postgres
from conftest import REPO
from lm.checks import ConfigError
from lm.sweep import spec, study as study_lib
from objectives import GRID, quadratic, run, sweep


def test_grid_enumerates_exactly_its_product(tmp_path):
  study = run(tmp_path, "grid", GRID)
  want = set(itertools.product([1e-4, 1e-3, 1e-2], [0, 10]))
  got = [(t.params["optimizer.learning_rate"],
          t.params["optimizer.warmup_steps"]) for t in study.trials]
  assert len(got) == len(want) == 6
  rounded = {(float(f"{lr:.6g}"), w) for lr, w in got}
  assert rounded == want
  assert all(t.state.name == "COMPLETE" for t in study.trials)
  assert [t.user_attrs["slot"] for t in study.trials] == list(range(6))


@pytest.mark.parametrize("method", ["random", "tpe", "gp"])
def test_a_seeded_sweep_repeats_its_trials(tmp_path, monkeypatch, method):
  """Seeds 0, 0, 1: the same trials, then others. gp is Optuna's
  GPSampler (torch); after the startup trials it, not a random fallback,
  proposes every trial."""
  modelled = []
  if method == "gp":
    sample = optuna.samplers.GPSampler.sample_relative

    def spy(self, study, trial, search_space):
      params = sample(self, study, trial, search_space)
      if params:  # {} during the startup trials.
        modelled.append(trial.number)
      return params
    monkeypatch.setattr(optuna.samplers.GPSampler, "sample_relative", spy)
  space = dict(optimizer=dict(
      learning_rate=dict(low=1e-4, high=1e-2, log=True),
      warmup_steps=dict(low=0, high=100)))
  trials = 4  # TPE's and GP's first 2 (sweep.startup_trials) are random.
  runs = []
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    (tmp_path / name).mkdir()
    study = run(tmp_path / name, method, space, trials, seed)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * trials
    runs.append([t.params for t in study.trials])
  assert runs[0] == runs[1]
  assert runs[0] != runs[2]
  assert len({p["optimizer.learning_rate"] for p in runs[0]}) == trials
  if method == "gp":
    assert modelled == [2, 3] * 3


def test_a_worker_starts_no_trial_after_its_minutes(tmp_path, monkeypatch):
  """sweep.budget.minutes=1.5 with trials of a minute each (a fake clock):
  the second trial starts at minute 1 and finishes, no third starts; the
  same command again runs the rest of the budget, in the next slots."""
  clock = [0.0]
  monkeypatch.setattr(study_lib, "time", types.SimpleNamespace(
      monotonic=lambda: clock[0], sleep=time.sleep))
  s, params = sweep("grid", GRID)
  study = study_lib.open_study(s, params, tmp_path, identity={})
  objective = quadratic(params, "grid")

  def a_minute(trial, slot):
    clock[0] += 60.0
    return objective(trial, slot)
  logged = []
  study_lib.work(study, a_minute, trials=6, minutes=1.5, log=logged.append)
  assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
  assert logged == ["sweep.budget.minutes=1.5 has passed: this worker starts "
                    "no more trials; rerun the command to go on."]
  study_lib.work(study, a_minute, trials=6, minutes=1.5, log=logged.append)
  assert len(study.trials) == 4
  study_lib.work(study, objective, trials=6, log=logged.append)
  assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6
  assert [t.user_attrs["slot"] for t in study.trials] == list(range(6))


WORKER = textwrap.dedent("""
    import pathlib, sys, time
    from objectives import GRID, quadratic, sweep
    from lm.sweep import spec, study as study_lib
    folder = pathlib.Path({folder!r})
    s, params = sweep("grid", GRID, storage={storage!r})
    study = study_lib.open_study(s, params, folder, identity={{}})
    (folder / f"ready_{{sys.argv[1]}}").touch()
    # Start together. In one loaded suite run (the other xdist worker
    # compiling) a worker waited over a minute for the other, which left no
    # trace of why: wait up to four, and the test reports both workers.
    waited = time.monotonic()
    while len(list(folder.glob("ready_*"))) < 2:
      if time.monotonic() - waited > 240:
        sys.exit("the other worker never opened the study")
      time.sleep(0.05)
    objective = quadratic(params, "grid")
    def slow(trial, slot):
      trial.set_user_attr("worker", sys.argv[1])
      time.sleep(0.2)  # Long enough for the other worker to ask meanwhile.
      return objective(trial, slot)
    study_lib.work(study, slow, trials=spec.grid_size(params),
                   log=lambda _: None)
""")


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request):
  """sweep.storage: "" (the default SQLite file in the workdir), or the URL
  of a PostgreSQL server started for the test (tests/sweep/postgres.py)."""
  if request.param == "sqlite":
    yield ""
    return
  assert postgres.binaries() is not None, (
      "PostgreSQL: install pgserver and psycopg[binary] "
      "(pip install -r requirements-test.txt)")
  with postgres.server() as url:
    yield url


def test_two_workers_share_one_study(tmp_path, storage):
  """Two processes on one study: every grid point runs once, none is lost,
  and both took trials."""
  code = WORKER.format(folder=str(tmp_path), storage=storage)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO, os.path.join(REPO, "tests", "sweep")]))
  workers = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=REPO,
                              env=env, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  errors = [w.communicate(timeout=400)[1] for w in workers]
  for i, (w, err) in enumerate(zip(workers, errors)):
    assert w.returncode == 0, f"worker {i}:\n{err[-3000:]}\n" + "\n".join(
        f"worker {j}, exit {v.returncode}:\n{e[-1500:]}"
        for j, (v, e) in enumerate(zip(workers, errors)) if j != i)
  # Read back by Optuna alone, from the database the URL names.
  study = optuna.load_study(study_name=tmp_path.name, storage=(
      storage or f"sqlite:///{tmp_path / 'study.db'}"))
  trials = [t for t in study.trials
            if not t.user_attrs.get(study_lib.OVER_BUDGET)]
  points = [tuple(sorted(t.params.items())) for t in trials]
  assert len(points) == 6 and len(set(points)) == 6
  assert all(t.state.name == "COMPLETE" for t in trials)
  assert {t.user_attrs["worker"] for t in trials} == {"0", "1"}


def test_a_worker_that_loses_the_schema_race_opens_the_study(tmp_path,
                                                             monkeypatch):
  """Two workers starting on a fresh PostgreSQL database both create
  Optuna's tables; the one that checked before the other committed gets
  'type "studydirection" already exists'. Replayed here on a real server:
  the schema exists, and this worker's first check for the enum type says
  it does not (as it did before the other worker's commit)."""
  from sqlalchemy.dialects.postgresql import base as pg
  assert postgres.binaries() is not None, (
      "PostgreSQL: install pgserver and psycopg[binary] "
      "(pip install -r requirements-test.txt)")
  has_type = pg.PGDialect.has_type
  checks = []

  def stale_check(self, *args, **kwargs):
    checks.append(args)
    return len(checks) > 1 and has_type(self, *args, **kwargs)
  with postgres.server() as url:
    s, params = sweep("grid", GRID, storage=url)
    study_lib.open_study(s, params, tmp_path, identity={})  # The other one.
    monkeypatch.setattr(pg.PGDialect, "has_type", stale_check)
    study = study_lib.open_study(s, params, tmp_path, identity={})
  assert len(checks) > 1  # It raced, and tried again.
  assert study.study_name == tmp_path.name


def test_a_storage_without_its_driver_says_what_to_install(tmp_path,
                                                           monkeypatch):
  monkeypatch.setitem(sys.modules, "psycopg2", None)  # Not installed.
  s, params = sweep("grid", GRID, storage="postgresql+psycopg2://sweeper:"
                    "secret@dbhost/sweeps")
  with pytest.raises(ConfigError) as e:
    study_lib.open_study(s, params, tmp_path, identity={})
  assert str(e.value) == (
      "sweep.storage=postgresql+psycopg2://sweeper:***@dbhost/sweeps: its "
      "database driver is not installed (psycopg2); pip install "
      "psycopg2-binary on every worker.")


def test_best_so_far():
  nan = float("nan")
  assert study_lib.best_so_far([3.0, nan, 1.0, 2.0], "minimize")[1:] == [
      3.0, 1.0, 1.0]
  assert study_lib.best_so_far([1.0, 3.0, 2.0], "maximize") == [1.0, 3.0, 3.0]


@pytest.mark.parametrize("space, message", [
    (dict(optimizer=dict(learning_rat=dict(low=1e-4, high=1e-2))),
     "sweep.space.optimizer.learning_rat: config.optimizer.learning_rat is "
     "not a key of the config; did you mean optimizer.learning_rate?"),
    (dict(optimizer=dict(learning_rate=dict(low=1e-3, high=1e-3))),
     "sweep.space.optimizer.learning_rate: the range low=0.001 high=0.001 "
     "is empty"),
    (dict(optimizer=dict(learning_rate=dict(low=1e-2, high=1e-4))),
     "is inverted; swap them (low=0.0001, high=0.01)"),
    (dict(optimizer=dict(warmup_steps=dict(low=0, high=10.5))),
     "sweep.space.optimizer.warmup_steps.high=10.5: config.optimizer."
     "warmup_steps is int"),
    (dict(optimizer=dict(learning_rate=dict(choices=()))),
     "sweep.space.optimizer.learning_rate.choices=() is empty"),
    (dict(optimizer=dict(learning_rate=dict(low=1e-4, hihg=1e-2))),
     "sweep.space.optimizer.learning_rate.hihg is unknown; did you mean "
     "sweep.space.optimizer.learning_rate.high?"),
    (dict(optimizer=dict(learning_rate=dict(low=0.0, high=1e-2, log=True))),
     "log=True needs low > 0"),
])
def test_a_bad_space_names_the_key_and_the_fix(space, message):
  with pytest.raises(ConfigError) as e:
    sweep("random", space)
  assert message in str(e.value)


def test_a_grid_range_needs_its_points():
  with pytest.raises(ConfigError, match="a grid needs its values: points=N"):
    sweep("grid", dict(optimizer=dict(
        learning_rate=dict(low=1e-4, high=1e-2, log=True))))


def test_an_unknown_sweep_key_names_the_nearest():
  with pytest.raises(ConfigError, match=r"sweep.budget.trails is unknown; "
                     r"did you mean sweep.budget.trials\?"):
    spec.resolve(dict(budget=dict(trails=3)))


def test_a_study_refuses_another_sweep(tmp_path):
  """Reopening a study with another space (or objective, method, seed,
  experiment config) is an error, not a study of mixed trials."""
  s, params = sweep("grid", GRID)
  study_lib.open_study(s, params, tmp_path, identity={"space": 1, "seed": 0})
  study_lib.open_study(s, params, tmp_path, identity={"space": 1, "seed": 0})
  with pytest.raises(ConfigError, match="was started with another seed; "
                     "resume it with its own command, or give a new "
                     "--workdir"):
    study_lib.open_study(s, params, tmp_path,
                         identity={"space": 1, "seed": 1})
