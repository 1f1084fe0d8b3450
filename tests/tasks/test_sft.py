"""The packed, weighted LM loss (SFT's response-only loss) and SFT runs."""
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_same_run, run_steps, tiny_config
from lm.data import packing, sft, tokenizer as tok_lib
from lm.tasks import language


class _Logits(nnx.Module):
  """A stand-in model whose logits are a parameter: the loss's dependence
  on each position's logits is then visible directly."""

  def __init__(self, logits_BxLxV):
    self.logits = nnx.Param(logits_BxLxV)

  def __call__(self, tokens_BxL, positions_BxL=None, **_):
    return self.logits[...], None


def _toy_batch():
  # Two rows: [prompt 3 | response 2 | pad 1], [prompt 1 | response 4 | pad 1].
  weights = np.array([[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0]], np.float32)
  segments = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]], np.int32)
  rng = np.random.default_rng(0)
  return {"inputs": rng.integers(0, 7, (2, 6)).astype(np.int32),
          "targets": rng.integers(0, 7, (2, 6)).astype(np.int32),
          "positions": np.tile(np.arange(6, dtype=np.int32), (2, 1)),
          "segment_ids": segments, "weights": weights}


def test_masked_loss_is_the_hand_computed_mean_over_response_tokens():
  batch = _toy_batch()
  logits = np.random.default_rng(1).normal(size=(2, 6, 7)).astype(np.float32)
  model = _Logits(jnp.asarray(logits))
  loss, count, _ = language.lm_loss(model, batch)
  # By hand, in float64: -log softmax(logits)[target], weighted mean.
  x = logits.astype(np.float64)
  log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_p, batch["targets"][..., None], -1)[..., 0]
  expect = (nll * batch["weights"]).sum() / batch["weights"].sum()
  assert float(count) == 6
  # float32 log-softmax of 7 logits, then a 12-term sum: a few ulps.
  np.testing.assert_allclose(float(loss), expect, rtol=1e-6)


def test_a_prompt_token_never_contributes_gradient():
  batch = _toy_batch()
  logits = np.random.default_rng(1).normal(size=(2, 6, 7)).astype(np.float32)
  model = _Logits(jnp.asarray(logits))
  graphdef, params = nnx.split(model)

  def loss_of(p, b):
    return language.lm_loss(nnx.merge(graphdef, p), b)[0]
  g = jax.grad(loss_of)(params, batch)["logits"][...]
  untrained = batch["weights"] == 0
  assert (np.asarray(g)[untrained] == 0).all()
  assert (np.abs(np.asarray(g)[~untrained]).sum(-1) > 0).all()
  # And a prompt token's target may be anything: same loss, bitwise.
  other = dict(batch, targets=np.where(untrained, 0, batch["targets"]))
  assert float(loss_of(params, other)) == float(loss_of(params, batch))


def _sft_batches(steps, rows=16, length=32):
  """Packed SFT batches from a few synthetic records."""
  rng = np.random.default_rng(0)
  records = [{"prompt": "x" * int(rng.integers(1, 12)),
              "response": "y" * int(rng.integers(1, 12))} for _ in range(80)]
  config = tiny_config("")
  ex, _ = sft.examples(records, config, tok_lib.get("byte"), "t")
  it = packing.train_iterator(grain.MapDataset.source(ex), length=length,
                              batch_size=rows, seed=0)
  return [next(it) for _ in range(steps)]


@pytest.fixture(scope="module")
def sft_reference():
  batches = _sft_batches(3)
  config = tiny_config("", **{"task": "sft", "data.packing": "segments"})
  return batches, run_steps(config, dict(data=1, fsdp=1, tensor=1), batches)


@pytest.mark.parametrize("mesh_shape, overrides", [
    (dict(data=2, fsdp=2, tensor=2), {}),
    (dict(data=2, fsdp=1, tensor=1, sequence=4), {}),
    (dict(data=2, fsdp=2, tensor=2), {"train.grad_accum_steps": 2}),
], ids=["dp-fsdp-tp", "sequence-ring", "accumulation"])
def test_packed_sft_sharded_equals_one_device(sft_reference, mesh_shape,
                                              overrides):
  batches, (ref_history, ref_state, _) = sft_reference
  config = tiny_config("", **{"task": "sft", "data.packing": "segments",
                              **overrides})
  history, state, _ = run_steps(config, mesh_shape, batches)
  assert_same_run(history, state, ref_history, ref_state)


def test_packed_sft_run_resumes_exactly(tmp_path, capsys):
  """Stopped and resumed, an SFT run packs the same windows and ends with
  the same parameters, bitwise: the packer's state is in the checkpoint.
  Its eval line is the response loss and perplexity, and what was read is
  reported."""
  from lm.run import loop, restore  # noqa: PLC0415
  rng = np.random.default_rng(0)
  records = tmp_path / "records.jsonl"
  records.write_text("".join(json.dumps(
      {"prompt": "x" * int(rng.integers(1, 12)),
       "response": "y" * int(rng.integers(1, 12))}) + "\n"
      for _ in range(200)))
  config = tiny_config("", mesh=dict(data=2, fsdp=2, tensor=2), **{
      "task": "sft", "data.packing": "segments", "train.steps": 4,
      "train.eval_every": 4,
      "data.sft.train": str(records), "data.sft.eval": str(records)})
  loop.train(config, tmp_path / "whole")
  loop.train(config, tmp_path / "split", stop_at_step=2)
  loop.train(config, tmp_path / "split")

  def losses(run):
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if r["split"] == "train"]
  assert losses(tmp_path / "whole") == losses(tmp_path / "split")
  assert "200 of 200 records used" in capsys.readouterr().out
  rows = map(json.loads, (tmp_path / "whole" / "metrics.jsonl").read_text()
             .splitlines())
  [line] = [r for r in rows if r["split"] == "eval"]
  assert line["perplexity"] == pytest.approx(np.exp(line["loss"]))
  assert "bits_per_byte" not in line
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(restore.load(tmp_path / "whole").params),
               jax.device_get(restore.load(tmp_path / "split").params))
