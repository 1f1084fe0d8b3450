"""DP-SGD in a run: bad privacy settings stop before anything compiles,
naming the key; a run with a budget stops at the last step it allows, with
a checkpoint, a message and epsilon in its eval lines; rerun, it stays."""
import json

import pytest

from conftest import FAMILIES
from lm import checks as base_checks
from lm.run import checks, loop
from lm.tasks import classify
from lm.train import accountant


def _private(family: str = "mlp", **privacy):
  c = FAMILIES[family]()
  c.privacy.update(noise_multiplier=1.0, **privacy)
  return c


def _refused(config, *words) -> None:
  with pytest.raises(base_checks.ConfigError) as e:
    checks.validate(config, num_devices=8)
  message = str(e.value)
  assert "\n" not in message
  for w in words:
    assert w in message, message


def test_bad_privacy_settings_are_refused_naming_the_key():
  _refused(_private("gan_mlp"), "config.privacy", "config.task='gan'")
  _refused(_private(clip_norm=0.0), "config.privacy.clip_norm=0.0")
  _refused(_private(delta=1.5), "config.privacy.delta=1.5")
  _refused(_private(sampling="bernoulli"), "config.privacy.sampling")
  off = FAMILIES["mlp"]()
  off.privacy.clip_norm = 2.0  # Would be ignored: privacy is off.
  _refused(off, "config.privacy.clip_norm", "privacy is off")
  fp16 = _private()
  fp16.precision.compute_dtype = "float16"
  _refused(fp16, "float16")
  text = _private("transformer_classifier")
  _refused(text, "config.data.balance_classes")
  text.data.balance_classes = False
  checks.validate(text, num_devices=8)  # Then it is fine.
  # A noise multiplier whose first step already spends more than the
  # budget (the plan is made from the data's size, before any compile).
  tiny = checks.validate(_private(target_epsilon=0.01), num_devices=8)[0]
  with pytest.raises(base_checks.ConfigError,
                     match="noise_multiplier=1 cannot reach config.privacy."
                     "target_epsilon=0.01"):
    accountant.plan(tiny, 1438)
  loose = checks.validate(_private(delta=0.01), num_devices=8)[0]
  with pytest.raises(base_checks.ConfigError,
                     match=r"config.privacy.delta=0.01 is not below 1 / 1438"):
    accountant.plan(loose, 1438)


def test_a_budget_stops_the_run_with_a_checkpoint(tmp_path, data_dir,
                                                  capsys):
  """noise 1.0 and a budget between epsilon(3) and epsilon(4): a 6-step run
  (Poisson batches of the digits) stops after step 3, saved, with epsilon
  in its eval lines; rerun, it trains no further."""
  config = _private()
  config.data.data_dir = data_dir
  config.train.update(steps=6, batch_size=64, eval_every=6, log_every=1,
                      checkpoint_every=0)
  config.optimizer.warmup_steps = 1
  resolved = checks.validate(config)[0]
  examples = classify.Classification(resolved).privacy_examples()
  q = 64 / examples
  spent = [accountant.epsilon(1.0, q, t, 1e-5) for t in (3, 4)]
  config.privacy.target_epsilon = sum(spent) / 2
  result = loop.train(config, tmp_path)
  assert result["step"] == 3
  assert "privacy budget spent: step 4 would take epsilon" in \
      capsys.readouterr().out
  assert (tmp_path / "checkpoints" / "3").is_dir()
  evals = [json.loads(s) for s in
           (tmp_path / "metrics.jsonl").read_text().splitlines()
           if '"eval"' in s]
  assert [e["step"] for e in evals] == [3]  # The last step evaluates.
  assert evals[-1]["epsilon"] == pytest.approx(spent[0], rel=1e-12)
  trains = [json.loads(s) for s in
            (tmp_path / "metrics.jsonl").read_text().splitlines()
            if '"train"' in s]
  assert all(0 < t["sampled"] < 2 * 64 for t in trains)
  again = loop.train(config, tmp_path)
  assert again["step"] == 3
