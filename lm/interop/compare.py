"""Our model's float32 logits against another implementation's, on random
tokens: the parity check behind scripts/compare_hf.py and the tests."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.run import restore


def logits_fn(loaded: restore.Loaded) -> Callable[[np.ndarray], np.ndarray]:
  """tokens B x L -> our float32 logits B x L x V, on the run's mesh."""
  forward = jax.jit(lambda params, tokens_BxL: nnx.merge(
      loaded.setup.graphdef, params)(tokens_BxL)[0])

  def run(tokens_BxL: np.ndarray) -> np.ndarray:
    with jax.set_mesh(loaded.setup.mesh):
      return np.asarray(forward(loaded.params,
                                jnp.asarray(tokens_BxL, jnp.int32)))
  return run


def kl_per_token(reference_BxLxV: np.ndarray, ours_BxLxV: np.ndarray
                 ) -> float:
  """Mean over tokens of KL(reference || ours), from float64 log-softmax."""
  ref = reference_BxLxV.astype(np.float64)
  ours = ours_BxLxV.astype(np.float64)
  log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
  log_q = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
  return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def compare(run: str | restore.Loaded,
            reference: Callable[[np.ndarray], np.ndarray],
            lengths: list[int], *, batch: int = 2, seed: int = 0,
            mesh: str | None = None) -> list[dict]:
  """Per length: max |logit difference|, KL per token, greedy agreement.
  `run`: a run directory (restored onto `mesh`) or a restored run."""
  loaded = run if isinstance(run, restore.Loaded) else restore.load(run,
                                                                    mesh)
  ours = logits_fn(loaded)
  vocab = loaded.setup.model_cfg.vocab_size
  rng = np.random.default_rng(seed)
  rows = []
  for length in lengths:
    tokens = rng.integers(0, vocab, (batch, length))
    a, b = reference(tokens), ours(tokens)
    rows.append({"length": length,
                 "max_abs_diff": float(np.abs(a - b).max()),
                 "kl_per_token": kl_per_token(a, b),
                 "argmax_agreement": float(np.mean(a.argmax(-1)
                                                   == b.argmax(-1)))})
  return rows


def greedy(loaded: restore.Loaded, prompt_ids: np.ndarray,
           max_new_tokens: int) -> np.ndarray:
  """Our greedy continuation (KV-cache decoding, as generate.py) of one
  prompt: max_new_tokens ids."""
  from lm import sample  # noqa: PLC0415
  fn = jax.jit(lambda params, prompt: sample.generate(
      loaded.setup.graphdef, params, prompt, jax.random.key(0),
      max_new_tokens=max_new_tokens, temperature=0.0))
  with jax.set_mesh(loaded.setup.mesh):
    return np.asarray(fn(loaded.params,
                         jnp.asarray(prompt_ids[None], jnp.int32)))[0]
