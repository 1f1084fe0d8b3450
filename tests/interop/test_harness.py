"""The lm-evaluation-harness adapter: its answers against our model's own
log-probs and eval loss, and the local tasks through the harness itself."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance

from conftest import REPO, init_run, tiny_config, xla_flags
from lm.interop import compare, harness, harness_tasks
from lm.run import restore
from lm.tasks import language


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return init_run(tmp_path_factory.mktemp("harness"))


@pytest.fixture(scope="module")
def model(run):
  return harness.HarnessLM(str(run), batch_size=4)


def _direct_logprobs(run, ids: list[int]) -> np.ndarray:
  """log p(ids[i+1] | ids[:i+1]) from our logits, whole sequence at once."""
  logits = compare.logits_fn(restore.load(run))(np.asarray([ids[:-1]]))
  logp = jax.nn.log_softmax(jnp.asarray(logits[0]), axis=-1)
  return np.asarray([logp[i, ids[i + 1]] for i in range(len(ids) - 1)])


def test_loglikelihood_is_the_sum_of_our_token_logprobs(run, model):
  pairs = [("ROMEO. ", "Good morrow"), ("", "abc"), ("x" * 40, "yz")]
  got = model.loglikelihood([Instance("loglikelihood", {}, p, i)
                             for i, p in enumerate(pairs)])
  for (context, continuation), (logp, _) in zip(pairs, got):
    stripped = context.rstrip()  # Trailing spaces score as continuation.
    cont_ids = list((context[len(stripped):] + continuation).encode())
    ids = ((list(stripped.encode()) or [0]) + cont_ids)[-(model.max_len + 1):]
    want = _direct_logprobs(run, ids)[-len(cont_ids):].sum()
    # float32 log-probs of a few tokens, summed in another order.
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-4)


def test_greedy_flag_says_whether_each_token_is_the_argmax(run, model):
  logits = compare.logits_fn(restore.load(run))(np.asarray([[0]]))[0]
  greedy = [int(np.argmax(logits[0]))]
  [(_, is_greedy)] = model.score_pairs([([0], greedy[:1])])
  assert is_greedy
  [(_, is_greedy)] = model.score_pairs([([0], [(greedy[0] + 1) % 256])])
  assert not is_greedy


def test_loglikelihood_rolling_is_our_eval_loss(run, model):
  """A text within one window: minus the rolling log-likelihood is our LM
  loss on [eos] + text, times its tokens."""
  text = "O Romeo, Romeo! wherefore art"  # 29 bytes < max_len 32.
  [rolling] = model.loglikelihood_rolling(
      [Instance("loglikelihood_rolling", {}, (text,), 0)])
  loaded = restore.load(run)
  tokens = np.asarray([[0, *text.encode()]], np.int32)
  with jax.set_mesh(loaded.setup.mesh):
    loss, count, _ = jax.jit(lambda p, t: language.lm_loss(
        nnx.merge(loaded.setup.graphdef, p), {"tokens": t}))(loaded.params,
                                                              tokens)
  np.testing.assert_allclose(-rolling, float(loss) * int(count), rtol=1e-5)


def test_rolling_windows_cover_a_long_text_once(run, model):
  text = "to be or not to be " * 10  # 190 bytes: several 32-token windows.
  [rolling] = model.loglikelihood_rolling(
      [Instance("loglikelihood_rolling", {}, (text,), 0)])
  assert rolling < 0
  # Each byte is predicted once: per byte, near a uniform model's log(256)
  # for this untrained model, not a multiple of it.
  assert 0.5 * np.log(256) < -rolling / len(text) < 2 * np.log(256)


def test_the_harness_own_tasks_are_indexed_only_when_asked_for(data_dir,
                                                                tmp_path):
  """The local tasks need only their folder; a task it lacks (one of the
  harness's own, here hellaswag) is still found."""
  harness_tasks.build(tiny_config(data_dir).data, tmp_path, items=4,
                      passages=2)
  local = harness_tasks.task_manager(list(harness_tasks.TASKS),
                                     [str(tmp_path)])
  assert set(local.all_tasks) == set(harness_tasks.TASKS)
  both = harness_tasks.task_manager(["shakespeare_rolling", "hellaswag"],
                                    [str(tmp_path)])
  assert {"hellaswag", *harness_tasks.TASKS} <= set(both.all_tasks)


@pytest.mark.slow
def test_the_local_tasks_run_through_the_harness(run, data_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, "scripts/eval_harness.py", f"--workdir={run}",
       "--limit=8", f"--tasks_dir={tmp_path / 'tasks'}"],
      cwd=REPO, env=dict(os.environ, XLA_FLAGS=xla_flags(),
                         LM_DATA_DIR=data_dir),
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "shakespeare_next_line" in result.stdout
  results = json.loads((run / "eval_harness.json").read_text())
  assert 0 <= results["shakespeare_next_line"]["acc,none"] <= 1
  # An untrained model: about 8 bits per byte (a uniform guess over 256).
  assert 6 < results["shakespeare_rolling"]["bits_per_byte,none"] < 10
