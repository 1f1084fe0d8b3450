"""DP-SGD in a run: bad privacy settings stop before anything compiles,
naming the key; a run with a budget stops at the last step it allows, with
a checkpoint, a message and epsilon in its eval lines; rerun, it stays."""
import json

import dp_accounting
import jax
import numpy as np
import pytest
from dp_accounting import rdp

from conftest import FAMILIES, run_steps, tiny_config
from lm import checks as base_checks, tasks
from lm.data import pipeline, tokenizer as tokenizer_lib
from lm.run import checks, loop
from lm.tasks import classify
from lm.train import accountant, checkpoint as ckpt_lib


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


LM_LEN = 16  # The windows' length (and the model's max_len).


def _private_lm(data_dir: str = "", **privacy):
  """The tiny LM, smaller (one layer, windows of 16 tokens), DP-SGD on."""
  c = tiny_config(data_dir, **{
      "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
      "model.n_kv_heads": 2, "model.d_ff": 64, "model.max_len": LM_LEN})
  c.mesh = dict(data=-1)
  c.privacy.update(**{"noise_multiplier": 1.0, "delta": 1e-7, **privacy})
  return c


def test_the_lms_bad_privacy_settings_are_refused_naming_the_key(tmp_path,
                                                                data_dir):
  """SFT, packed segments and experts are refused at validation; a delta
  not below 1 / (the LM's windows) when the run counts them, before any
  compile."""
  sft = _private_lm()
  sft.task, sft.data.packing = "sft", "segments"
  sft.data.sft.update(train="shakespeare_dialogue", eval="shakespeare_dialogue")
  _refused(sft, "config.task='sft'", "packed several to a window")
  segments = _private_lm()
  segments.data.packing = "segments"
  _refused(segments, "config.data.packing='segments'", "concat")
  moe = _private_lm()
  moe.model.moe.experts = 2
  _refused(moe, "config.model.moe.experts")
  checks.validate(_private_lm(), num_devices=8)  # The LM itself is fine.
  loose = _private_lm(data_dir, delta=1e-3)
  with pytest.raises(base_checks.ConfigError,
                     match=r"^config.privacy.delta=0.001 is not below 1 / "
                     r"\d+ training examples.*Use e.g. config.privacy.delta="):
    loop.train(loose, tmp_path)


def test_the_lms_private_batches_are_its_disjoint_windows(data_dir):
  """Both samplings draw the examples the accountant counts: Poisson
  batches (masked padding) and shuffled ones, every row one of the
  disjoint windows of L+1 tokens (row k starts at token k * (L+1))."""
  tok = tokenizer_lib.get("byte")
  for sampling in ("poisson", "shuffle"):
    config = checks.validate(_private_lm(data_dir, sampling=sampling))[0]
    task = tasks.get(config)
    tokens = pipeline.load_tokens(pipeline.prepare(config.data), "train",
                                  tok).tokens
    assert task.privacy_examples() == len(tokens) // (LM_LEN + 1)
    batch = next(task.make_data().train)
    rows = batch["tokens"][batch["mask"] > 0] if "mask" in batch \
        else batch["tokens"]
    assert len(rows) and ("mask" in batch) == (sampling == "poisson")
    disjoint = {bytes(tokens[k:k + LM_LEN + 1])
                for k in range(0, len(tokens) - LM_LEN, LM_LEN + 1)}
    assert all(bytes(row.astype(np.uint8)) in disjoint for row in rows)


def test_a_private_lm_run_logs_dp_accountings_epsilon_and_equals_one_device(
    tmp_path, data_dir):
  """The tiny LM on data=2 x fsdp=2 x tensor=2, noise 1.0 and a budget
  between epsilon(1) and epsilon(2) of a 3-step run: it stops after step 1
  and logs, at its eval, dp-accounting's epsilon for (q = batch / windows,
  sigma, 1 step, delta), composed here, with the windows counted here
  (disjoint, L+1 tokens). Its step equals one device's with 2 accumulation
  steps on the same Poisson batch: plain SGD at learning rate 1, so the
  update is the private gradient, noise included (drawn once for the global
  batch; noise per device would differ by its whole size). Tolerance: a
  reordered float32 sum over the batch's tokens, plus the rounding of p - g
  to float32 on each side."""
  config = _private_lm(data_dir)
  config.mesh = dict(data=2, fsdp=2, tensor=2)
  config.train.update(steps=3, batch_size=8, eval_every=3, eval_batches=1)
  config.optimizer.update(name="sgd", learning_rate=1.0, schedule="constant",
                          warmup_steps=0, weight_decay=0.0,
                          grad_clip_norm=0.0)
  tok = tokenizer_lib.get(config.data.tokenizer)
  tokens = pipeline.load_tokens(pipeline.prepare(config.data), "train", tok)
  q = 8 / (len(tokens.tokens) // (LM_LEN + 1))

  def dp_epsilon(steps):
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(1.0)), steps)
    return acc.get_epsilon(1e-7)

  config.privacy.target_epsilon = (dp_epsilon(1) + dp_epsilon(2)) / 2
  result = loop.train(config, tmp_path)
  assert result["step"] == 1
  lines = [json.loads(s) for s in
           (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [e for e in lines if e["split"] == "eval"]
  assert [e["step"] for e in evals] == [1]
  assert evals[0]["epsilon"] == pytest.approx(dp_epsilon(1), rel=1e-9)
  train = [t for t in lines if t["split"] == "train"]
  assert len(train) == 1

  # The same step on one device, from the same init, on the batch the run
  # drew (Poisson batch t is a pure function of t and the seed).
  resolved = checks.validate(config)[0]
  batch = next(tasks.get(resolved).make_data().train)
  assert batch["mask"].sum() == train[0]["sampled"]
  rows = len(batch["mask"])
  one = config.copy_and_resolve_references()
  one.train.grad_accum_steps = 2
  history, state, setup = run_steps(one, dict(data=1), [batch])
  with jax.set_mesh(setup.mesh):
    init = jax.device_get(setup.init_fn(jax.random.key(config.seed)).params)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", async_save=False)
  run = jax.device_get(ckpt.restore(setup.abstract_state).params)
  ckpt.close()
  eps = np.finfo(np.float32).eps

  def same(p0, p_one, p_run):
    p0, p_one, p_run = (np.asarray(x, np.float64) for x in (p0, p_one,
                                                            p_run))
    g_one, g_run = p0 - p_one, p0 - p_run
    atol = (2 * eps * np.sqrt(rows * LM_LEN) * np.max(np.abs(g_one))
            + eps * np.max(np.abs(p_one)))
    np.testing.assert_allclose(g_run, g_one, rtol=0, atol=atol)
    return np.max(np.abs(g_one))

  sizes = jax.tree.leaves(jax.tree.map(same, init, state.params, run))
  assert min(sizes) > 0.01  # The noise (std 1/8) is in every update.
  for key in ("loss", "sampled", "clipped_fraction", "grad_norm"):
    assert history[0][key] == pytest.approx(train[0][key], rel=1e-5), key
