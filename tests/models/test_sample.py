"""Sampling: filters keep exactly the right tokens; greedy decoding with the
KV cache equals greedy decoding by full forward passes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import sample
from lm.models import transformer


def test_top_k_keeps_k_largest():
  logits = jnp.array([[1.0, 5.0, 3.0, 4.0, 2.0]])
  kept = sample.filter_logits(logits, top_k=2) > -1e30
  np.testing.assert_array_equal(kept, [[False, True, False, True, False]])


def test_top_p_keeps_the_smallest_set_reaching_p():
  probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
  kept = sample.filter_logits(jnp.log(probs), top_p=0.75) > -1e30
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  kept = sample.filter_logits(jnp.log(probs), top_p=0.1) > -1e30
  np.testing.assert_array_equal(kept, [[True, False, False, False]])


def test_sampling_respects_the_filter():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 512))
  draws = sample.choose(logits, jax.random.key(0), temperature=1.0, top_k=2,
                        top_p=1.0)
  assert set(np.unique(draws)) == {0, 1}


def _assert_greedy(graphdef, params, prompt_BxP, n: int) -> None:
  """generate's greedy continuation (KV-cache decoding) is what the full
  forward's argmax picks. Checked with one forward over prompt + the
  continuation: by causality its logits at position P - 1 + i are those of
  the forward over the first P + i tokens, so argmax there == token i for
  every i holds exactly when each token is the greedy pick after the ones
  before it (the first wrong token fails it)."""
  params = nnx.to_pure_dict(params)
  out_BxN = jax.jit(functools.partial(
      sample.generate, graphdef, max_new_tokens=n, temperature=0.0))(
          params, prompt_BxP, jax.random.key(0))
  P = prompt_BxP.shape[1]
  tokens = jnp.concatenate([prompt_BxP, out_BxN[:, :-1]], axis=1)
  logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])(params, tokens)
  np.testing.assert_array_equal(out_BxN, jnp.argmax(logits[:, P - 1:], -1))


def test_greedy_generate_matches_full_forward_argmax():
  cfg = transformer.Config(vocab_size=64, max_len=32, d_model=32,
                           n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  graphdef, params = nnx.split(transformer.Model(cfg, nnx.Rngs(0)))
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)
  _assert_greedy(graphdef, params, prompt, 8)


def test_greedy_generate_on_an_moe_model_matches_full_forward_argmax():
  """configs/lm.py:moe (MoE aux losses are sown in training, never when
  decoding: a sow inside generate's lax.scan failed). Routing without
  capacity drops: with drops a token's output depends on which tokens
  share its dispatch group (B x 1 when decoding, B x L in a full forward),
  so greedy tokens could rightly differ."""
  import dataclasses  # noqa: PLC0415

  from configs import lm as lm_config  # noqa: PLC0415
  from lm import models  # noqa: PLC0415
  cfg = models.model_config(lm_config.get_config("moe"))
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
      cfg.moe, capacity_factor=cfg.moe.experts / cfg.moe.top_k))
  graphdef, params = nnx.split(transformer.Model(cfg, nnx.Rngs(0)))
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
  _assert_greedy(graphdef, params, prompt, 6)
