"""The study: Optuna's record of a sweep's trials in a database, and the
worker loop that runs them. Knows nothing of training: a trial is
`objective(trial, slot) -> value` (lm/sweep/trial.py trains one run).

Slots. Each new trial of the study is a slot: slot k is trial k's run
directory (WORKDIR/trial_k). The budget (`sweep.budget.trials`) counts
slots, and a grid's point r belongs to the r-th slot. A trial that did not
end (its worker was killed, or stopped by SIGTERM / Ctrl-C, or an error
that is not a diverged loss stopped the worker) is run again in the same
slot, from its checkpoint: Optuna marks it FAIL and enqueues its parameters
(`RetryHeartbeatStaleTrialCallback`, with its intermediate evals), and the
retry carries the original trial number (`failed_trial`). A killed worker is
noticed by its heartbeat: none for `sweep.stale_after_s` seconds.

Several workers (processes, machines) run the same command on one study;
trial numbers come from the database, so slots, grid points and sampler
seeds never repeat, and a worker that finds no slot left waits for the
running trials (taking over any that go stale) before it returns.
"""
from __future__ import annotations

import math
import random
import time
import warnings
from pathlib import Path
from typing import Callable

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from lm import checks
from lm.sweep import space as space_lib

ConfigError = checks.ConfigError
Objective = Callable[[optuna.Trial, int], float]
# The user attribute that marks a trial started after the budget was spent
# (two workers asked for the last slot at once); it never runs.
OVER_BUDGET = "over_budget"


# The pip package of a database driver SQLAlchemy imports by module name.
# A bare postgresql:// URL means SQLAlchemy's default PostgreSQL driver:
# psycopg (3) from SQLAlchemy 2.1 on, psycopg2 before.
DRIVERS = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary"}
# PostgreSQL's SQLSTATEs for creating what exists, as a worker that lost
# the race to create Optuna's schema sees: duplicate_object (an enum type),
# duplicate_table.
DUPLICATE_SCHEMA = {"42710", "42P07"}


class TrialError(Exception):
  """A trial's own bad outcome (a diverged loss): it is recorded as FAIL
  and the sweep goes on."""


class _OverBudget(Exception):
  pass


def storage_url(sweep, workdir: Path) -> str:
  return sweep.storage or f"sqlite:///{Path(workdir).resolve() / 'study.db'}"


def open_study(sweep, params: list[space_lib.Param], workdir: Path, *,
               identity: dict) -> optuna.Study:
  """The sweep's study, created or loaded. `identity` (the searched keys,
  the objective, the method, the experiment's config) is stored with a new
  study; loading one that differs is a ConfigError, not a mixed study."""
  url = storage_url(sweep, workdir)
  engine = {}
  if url.startswith("sqlite:"):
    # Workers and heartbeat threads take turns at the file; wait for the
    # lock rather than failing after sqlite's default 5 s.
    engine = {"connect_args": {"timeout": 120}}
  storage = _storage(sweep, url, engine)
  if url.startswith("sqlite:"):
    _wal(storage.engine)
  name = sweep.study_name or Path(workdir).name
  study = optuna.create_study(
      storage=storage, study_name=name, sampler=sampler(sweep, params),
      pruner=pruner(sweep.pruner), direction=sweep.objective.direction,
      load_if_exists=True)
  stored = study.user_attrs.get("identity")
  if stored is None:
    study.set_user_attr("identity", identity)
  elif stored != identity:
    keys = sorted(k for k in set(stored) | set(identity)
                  if stored.get(k) != identity.get(k))
    raise ConfigError(
        f"study {name!r} in {_hide_password(url)} was started with another "
        f"{', '.join(keys)}; resume it with its own command, or give a new "
        "--workdir (or sweep.study_name).")
  return study


def _storage(sweep, url: str, engine: dict) -> optuna.storages.RDBStorage:
  import sqlalchemy  # noqa: PLC0415 - Optuna's own dependency.
  for attempt in range(5):
    try:
      with warnings.catch_warnings():  # Heartbeats are "experimental".
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=sweep.heartbeat_s,
            grace_period=sweep.stale_after_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                inherit_intermediate_values=True))
    except ImportError as e:
      # Optuna wraps the driver's ModuleNotFoundError in an ImportError.
      missing = e if isinstance(e, ModuleNotFoundError) else e.__cause__
      name = getattr(missing, "name", None)
      scheme = url.split(":", 1)[0]  # postgresql+psycopg: psycopg.
      driver = name or scheme.split("+", 1)[-1]
      why = "" if name else f": {e}"
      raise ConfigError(
          f"sweep.storage={_hide_password(url)}: its database driver is not "
          f"installed ({driver}{why}); pip install "
          f"{DRIVERS.get(driver, driver)} on every worker.") from e
    except sqlalchemy.exc.ArgumentError as e:
      raise ConfigError(
          f"sweep.storage={_hide_password(url)} is not a database URL "
          f"({e}); e.g. postgresql+psycopg://USER:PASSWORD@HOST/DB, or "
          "leave it empty for SQLite.") from e
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.ProgrammingError) as e:
      # Another worker is creating the same tables right now: once it has,
      # opening succeeds. On PostgreSQL the loser sees a table or enum type
      # that did not exist when it checked ("already exists").
      if attempt == 4 or (isinstance(e, sqlalchemy.exc.ProgrammingError)
                          and _sqlstate(e) not in DUPLICATE_SCHEMA):
        raise
      time.sleep(0.2 + random.random())
  raise AssertionError("unreachable")


def _sqlstate(e) -> str | None:
  """The server's error code: psycopg 3 calls it sqlstate, psycopg2 pgcode."""
  return getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)


def _wal(engine) -> None:
  """SQLite in write-ahead-log mode with `synchronous=NORMAL`: a commit
  no longer waits for the disk (a trial makes a few dozen), readers do not
  block the writer (other workers, heartbeats), and a killed process loses
  nothing committed (only a power cut could lose the last commits)."""
  import sqlalchemy  # noqa: PLC0415 - Optuna's own dependency.

  def pragmas(connection, _):
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
  sqlalchemy.event.listen(engine, "connect", pragmas)
  engine.dispose()  # Connections made before the listener: closed.


def _hide_password(url: str) -> str:
  head, at, tail = url.rpartition("@")
  if not at or "://" not in head:
    return url
  scheme, _, user = head.partition("://")
  return f"{scheme}://{user.split(':')[0]}:***@{tail}"


def sampler(sweep, params: list[space_lib.Param]) -> optuna.samplers.BaseSampler:
  if sweep.method == "grid":
    return _Grid({p.key: p.grid() for p in params}, seed=sweep.seed)
  if sweep.method == "random":
    return _SeedPerTrial(optuna.samplers.RandomSampler, sweep.seed)
  make = {"tpe": optuna.samplers.TPESampler,
          "gp": optuna.samplers.GPSampler}[sweep.method]
  return _SeedPerTrial(
      lambda seed: make(seed=seed, n_startup_trials=sweep.startup_trials),
      sweep.seed)


def pruner(config) -> optuna.pruners.BasePruner:
  if config.name == "median":
    return optuna.pruners.MedianPruner(
        n_startup_trials=config.startup_trials,
        n_warmup_steps=config.warmup_steps)
  if config.name == "halving":
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=config.min_resource or "auto",
        reduction_factor=config.reduction_factor)
  return optuna.pruners.NopPruner()


def slot_of(trial: optuna.trial.FrozenTrial) -> int:
  """The run directory's number: the original trial's, for a retry."""
  return trial.system_attrs.get("failed_trial", trial.number)


def fresh_rank(study: optuna.Study, number: int) -> int:
  """How many new trials (not retries) the study has below trial `number`:
  the new trial `number` takes the slot budget position it returns."""
  return _fresh_below(study.get_trials(deepcopy=False), number)


def _fresh_below(trials, number: float = math.inf) -> int:
  return sum(1 for t in trials
             if t.number < number and "failed_trial" not in t.system_attrs)


class _Grid(optuna.samplers.GridSampler):
  """Optuna's grid, with point r for the r-th new trial. GridSampler gives
  trial number r point r, but retries take trial numbers too, and its
  fallback for later numbers can hand one point to two workers at once;
  counting new trials keeps every point to one trial. Retries keep their
  point (their `grid_id` is copied)."""

  def before_trial(self, study, trial) -> None:
    if "grid_id" in trial.system_attrs:
      return
    rank = fresh_rank(study, trial.number)
    if rank < len(self._all_grids):  # Else over budget: it never runs.
      study._storage.set_trial_system_attr(trial._trial_id, "search_space",
                                           self._search_space)
      study._storage.set_trial_system_attr(trial._trial_id, "grid_id", rank)

  def after_trial(self, study, trial, state, values) -> None:
    pass  # The worker loop, not the sampler, decides when the sweep ends.


class _SeedPerTrial(optuna.samplers.BaseSampler):
  """A sampler seeded by (seed, trial number) for each trial: one worker
  with one seed repeats its trials exactly, and two workers never draw the
  same random parameters (one shared seed would give both the same
  sequence). What the Bayesian methods learn comes from the study's
  finished trials, which every worker reads from the database."""

  def __init__(self, make: Callable[..., optuna.samplers.BaseSampler],
               seed: int):
    self._make, self._seed, self._by_trial = make, seed, {}

  def _for(self, trial) -> optuna.samplers.BaseSampler:
    if trial.number not in self._by_trial:
      seed = (self._seed * 1_000_003 + trial.number) % 2 ** 32
      with warnings.catch_warnings():  # GPSampler is "experimental".
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        self._by_trial[trial.number] = self._make(seed=seed)
    return self._by_trial[trial.number]

  def infer_relative_search_space(self, study, trial):
    return self._for(trial).infer_relative_search_space(study, trial)

  def sample_relative(self, study, trial, search_space):
    return self._for(trial).sample_relative(study, trial, search_space)

  def sample_independent(self, study, trial, param_name, distribution):
    return self._for(trial).sample_independent(study, trial, param_name,
                                               distribution)

  def before_trial(self, study, trial) -> None:
    self._for(trial).before_trial(study, trial)

  def after_trial(self, study, trial, state, values) -> None:
    self._by_trial.pop(trial.number, self._for(trial)).after_trial(
        study, trial, state, values)

  def reseed_rng(self) -> None:
    pass  # Seeds come from trial numbers.


def work(study: optuna.Study, objective: Objective, *, trials: int,
         minutes: float = 0.0, poll_s: float = 1.0,
         log: Callable[[str], None] = print,
         after: Callable[[], object] | None = None) -> None:
  """Runs the study's trials until `trials` slots have ended (all workers
  together), or `minutes` have passed (0 = no limit; a running trial
  finishes). A trial the objective raises TrialError for is FAIL; any other
  exception ends the worker and its trial is enqueued to run again.
  `after()` runs after each trial this worker ends (the report)."""
  start = time.monotonic()
  running: list[int] = []  # The trial this worker is running.

  def run(trial: optuna.Trial) -> float:
    running[:] = [trial.number]
    every = study.get_trials(deepcopy=False)
    frozen = next(t for t in every if t.number == trial.number)
    if ("failed_trial" not in frozen.system_attrs
        and _fresh_below(every, trial.number) >= trials):
      trial.set_user_attr(OVER_BUDGET, True)
      raise _OverBudget
    return objective(trial, slot_of(frozen))

  while True:
    if minutes and time.monotonic() - start > 60 * minutes:
      log(f"sweep.budget.minutes={minutes:g} has passed: this worker starts "
          "no more trials; rerun the command to go on.")
      return
    every = study.get_trials(deepcopy=False)
    states = {t.state for t in every if not t.user_attrs.get(OVER_BUDGET)}
    if TrialState.WAITING not in states and _fresh_below(every) >= trials:
      if TrialState.RUNNING not in states:
        return
      # Running elsewhere, or killed: wait, and take over any gone stale.
      time.sleep(poll_s)
      _fail_stale(study)
      continue
    running.clear()
    try:
      study.optimize(run, n_trials=1, catch=(TrialError, _OverBudget))
    except BaseException:
      if running:
        _retry(study, running[0])
        log(f"trial {running[0]} did not finish: it runs again, from its "
            "checkpoint, when the sweep is rerun.")
      raise
    if after is not None and running:
      after()


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
  return next(t for t in study.get_trials(deepcopy=False)
              if t.number == number)


def _fail_stale(study: optuna.Study) -> None:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    optuna.storages.fail_stale_trials(study)


def _retry(study: optuna.Study, number: int) -> None:
  """Trial `number`, which Optuna has just marked FAIL for the exception
  that stopped it, enqueued to run again in its slot."""
  frozen = _frozen(study, number)
  if frozen.state == TrialState.RUNNING:  # Not told yet: tell it.
    study.tell(number, state=TrialState.FAIL)
    frozen = _frozen(study, number)
  if frozen.state == TrialState.FAIL:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(
          study, frozen)


def best_so_far(values: list[float], direction: str) -> list[float]:
  """The running best of `values` (NaN for a trial without a value)."""
  out, best = [], math.nan
  pick = min if direction == "minimize" else max
  for v in values:
    if not math.isnan(v):
      best = v if math.isnan(best) else pick(best, v)
    out.append(best)
  return out
