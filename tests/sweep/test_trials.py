"""Sweeps of real runs (the MLP on digits for a few steps, in this
process): a clearly worse trial is pruned at its first eval through the
loop's on_eval hook, by the median pruner and by successive halving, and
the results table and plots are written."""
import json

from configs import mlp_digits
from lm.sweep import checks as sweep_checks, report, study as study_lib
from lm.sweep import trial as trial_lib


def mlp(data_dir):
  c = mlp_digits.get_config()
  c.data.data_dir = data_dir
  c.model.update(width=16, depth=1)
  c.train.update(steps=8, batch_size=32, log_every=4, eval_every=4,
                 checkpoint_every=0)
  c.optimizer.warmup_steps = 0
  return c


def test_a_clearly_worse_trial_is_pruned(data_dir, tmp_path):
  sweep = dict(method="random", budget=dict(trials=2),
               space=dict(optimizer=dict(
                   learning_rate=dict(low=1e-8, high=1e-1, log=True))),
               objective=dict(metric="loss", direction="minimize"),
               pruner=dict(name="median", startup_trials=1))
  sweep, config, params = sweep_checks.check(sweep, mlp(data_dir))
  study = study_lib.open_study(sweep, params, tmp_path, identity={})
  # A learning rate that trains, then one that cannot move the weights.
  study.enqueue_trial({"optimizer.learning_rate": 1e-2})
  study.enqueue_trial({"optimizer.learning_rate": 1e-8})
  study_lib.work(study, trial_lib.objective(config, sweep, params, tmp_path),
                 trials=2)
  good, bad = study.trials
  assert good.state.name == "COMPLETE" and bad.state.name == "PRUNED"
  assert bad.intermediate_values[4] > good.intermediate_values[4]
  # The pruned run stopped at its first eval: no step after 4.
  lines = [json.loads(line) for line in
           (tmp_path / "trial_1" / "metrics.jsonl").read_text().splitlines()]
  assert max(m["step"] for m in lines) == 4
  assert good.value == [m for m in map(json.loads, (
      tmp_path / "trial_0" / "metrics.jsonl").read_text().splitlines())
      if m["split"] == "eval"][-1]["loss"]

  results = report.write(study, tmp_path, metric="loss")
  assert results["best"]["trial"] == 0
  csv = (tmp_path / "results.csv").read_text().splitlines()
  assert csv[0].startswith("trial,state,value,optimizer.learning_rate,")
  assert [row.split(",")[1] for row in csv[1:]] == ["COMPLETE", "PRUNED"]
  for name in ("best_so_far", "parallel_coordinates"):
    assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:4] == (
        b"\x89PNG")


def test_successive_halving_prunes_a_clearly_worse_trial(data_dir, tmp_path):
  """pruner=halving, first rung at step 4 (the first eval), half promoted:
  the trial that trains passes both rungs (steps 4 and 8); the one that
  cannot move its weights is not in the better half at step 4."""
  sweep = dict(method="random", budget=dict(trials=2),
               space=dict(optimizer=dict(
                   learning_rate=dict(low=1e-8, high=1e-1, log=True))),
               objective=dict(metric="loss", direction="minimize"),
               pruner=dict(name="halving", min_resource=4,
                           reduction_factor=2))
  sweep, config, params = sweep_checks.check(sweep, mlp(data_dir))
  study = study_lib.open_study(sweep, params, tmp_path, identity={})
  study.enqueue_trial({"optimizer.learning_rate": 1e-2})
  study.enqueue_trial({"optimizer.learning_rate": 1e-8})
  study_lib.work(study, trial_lib.objective(config, sweep, params, tmp_path),
                 trials=2, log=lambda _: None)
  good, bad = study.trials
  assert good.state.name == "COMPLETE" and bad.state.name == "PRUNED"
  assert bad.intermediate_values[4] > good.intermediate_values[4]
  assert {k for k in good.system_attrs if k.startswith("completed_rung")} == {
      "completed_rung_0", "completed_rung_1"}
  lines = [json.loads(line) for line in
           (tmp_path / "trial_1" / "metrics.jsonl").read_text().splitlines()]
  assert max(m["step"] for m in lines) == 4
