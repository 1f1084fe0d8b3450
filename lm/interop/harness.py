"""EleutherAI's lm-evaluation-harness on any run directory and mesh.

`HarnessLM(workdir)` is an `lm_eval.api.model.LM`: the harness asks it for

  loglikelihood          (context, continuation) -> (sum of the
                         continuation's token log-probs, whether every one
                         of its tokens is the greedy choice)
  loglikelihood_rolling  (text,) -> the text's total log-likelihood, in
                         windows of the model's max_len (the harness's own
                         rolling windows, each token predicted once)
  generate_until         (context, {until, max_gen_toks, ...}) -> greedy
                         text, cut at the first stop string

Scoring is batched: sequences sorted by length, padded on the right to a
power-of-two bucket (so a task compiles a few shapes, not one per request)
and scored by one jitted function that returns each target's log-prob and
whether it is the argmax. Right padding changes nothing before it in a
causal model, so padded and unpadded scores agree. Texts are tokenized
with the run's tokenizer (config.data.tokenizer); a context's tokens are
those of the context alone and the continuation's are what encoding both
adds after them, as the harness's own models do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import LM
from lm_eval import utils as lm_eval_utils

from lm.data import tokenizer as tokenizer_lib
from lm.parallel import rules as rules_lib
from lm.run import restore


# A handful of sequences cannot be split over the batch axes: the batch is
# replicated, the parameters stay sharded as in training.
_REPLICATED_BATCH = dataclasses.replace(rules_lib.Rules(), batch=None)


def _bucket(length: int, limit: int) -> int:
  """The padded length: the next power of two (at least 16), at most
  `limit`."""
  return min(limit, max(16, 1 << (length - 1).bit_length()))


class HarnessLM(LM):

  def __init__(self, workdir: str, mesh: str | None = None,
               batch_size: int = 8):
    super().__init__()
    with rules_lib.use(_REPLICATED_BATCH):
      self.loaded = restore.load(workdir, mesh)
    self.config = self.loaded.config
    self.tok = tokenizer_lib.get(self.config.data.tokenizer)
    self.max_len = self.loaded.setup.model_cfg.max_len
    self.batch_size = batch_size
    graphdef = self.loaded.setup.graphdef

    @jax.jit
    def score(params, inputs_BxL, targets_BxL):
      logits_BxLxV, _ = nnx.merge(graphdef, params)(inputs_BxL)
      logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
      logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None],
                                     axis=-1)[..., 0]
      greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
      return logp_BxL, greedy_BxL
    self._score = score

  @contextlib.contextmanager
  def _on_mesh(self):
    with rules_lib.use(_REPLICATED_BATCH), jax.set_mesh(
        self.loaded.setup.mesh):
      yield

  # The harness's hooks.

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = []
    for request in requests:
      context, continuation = request.args
      pairs.append(self._encode_pair(context, continuation))
    return self.score_pairs(pairs)

  def loglikelihood_rolling(self, requests) -> list[float]:
    out = []
    for request in requests:
      (text,) = request.args
      windows = [lm_eval_utils.make_disjoint_window(w) for w in
                 lm_eval_utils.get_rolling_token_windows(
                     token_list=[int(i) for i in self.tok.encode(text)],
                     prefix_token=self.tok.eos_id, max_seq_len=self.max_len,
                     context_len=1)]
      out.append(sum(logp for logp, _ in self.score_pairs(windows)))
    return out

  def generate_until(self, requests) -> list[str]:
    out = []
    for request in requests:
      context, kwargs = request.args
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.get("max_gen_toks", 256))
      prompt = self._context_ids(context)
      max_new = max(1, min(max_new, self.max_len - 1))
      prompt = prompt[-(self.max_len - max_new):]
      with self._on_mesh():
        ids = np.asarray(_generate(self.loaded.setup.graphdef, max_new)(
            self.loaded.params, jnp.asarray(prompt[None], jnp.int32),
            jax.random.key(0)))[0]
      text = self.tok.decode(np.concatenate([prompt, ids]))
      text = text[len(self.tok.decode(prompt)):]
      for stop in until:
        if stop and stop in text:
          text = text[:text.index(stop)]
      out.append(text)
    return out

  # Scoring.

  def _context_ids(self, context: str) -> np.ndarray:
    ids = np.asarray(self.tok.encode(context), np.int32)
    # An empty context conditions on the end-of-document token.
    return ids if ids.size else np.asarray([self.tok.eos_id], np.int32)

  def _encode_pair(self, context: str, continuation: str
                   ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness's models split them:
    trailing spaces of the context move to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = [int(i) for i in self._context_ids(context)]
    whole = [int(i) for i in self.tok.encode(context + continuation)]
    if context and whole[:len(context_ids)] == context_ids:
      return context_ids, whole[len(context_ids):]
    return context_ids, [int(i) for i in self.tok.encode(continuation)]

  def score_pairs(self, pairs: list[tuple[list[int], list[int]]]
                  ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), all greedy) per pair; the
    context is cut from the left so that both fit max_len + 1 tokens."""
    rows = []
    for context, continuation in pairs:
      whole = (list(context) + list(continuation))[-(self.max_len + 1):]
      rows.append((whole, len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      length = _bucket(max(len(rows[i][0]) - 1 for i in chunk), self.max_len)
      inputs = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros((self.batch_size, length), np.int32)
      for row, i in enumerate(chunk):
        whole = rows[i][0]
        inputs[row, :len(whole) - 1] = whole[:-1]
        targets[row, :len(whole) - 1] = whole[1:]
      with self._on_mesh():
        logp, greedy = jax.device_get(self._score(
            self.loaded.params, inputs, targets))
      for row, i in enumerate(chunk):
        whole, n = rows[i]
        end = len(whole) - 1
        n = min(n, end)  # A continuation longer than the window: its tail.
        results[i] = (float(np.sum(logp[row, end - n:end], dtype=np.float64)),
                      bool(np.all(greedy[row, end - n:end])))
    return results


@functools.lru_cache(maxsize=8)
def _generate(graphdef, max_new_tokens: int):
  from lm import sample  # noqa: PLC0415
  return jax.jit(functools.partial(sample.generate, graphdef,
                                   max_new_tokens=max_new_tokens,
                                   temperature=0.0))
