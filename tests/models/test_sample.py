"""Sampling: filters keep exactly the right tokens; greedy decoding with the
KV cache equals greedy decoding by full forward passes."""
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


def test_greedy_generate_matches_full_forward_argmax():
  cfg = transformer.Config(vocab_size=64, max_len=32, d_model=32,
                           n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  model = transformer.Model(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)
  out = sample.generate(graphdef, nnx.to_pure_dict(params), prompt,
                        jax.random.key(0), max_new_tokens=8, temperature=0.0)
  tokens = prompt
  for _ in range(8):
    logits, _ = model(tokens)
    tokens = jnp.concatenate([tokens, jnp.argmax(logits[:, -1:], -1)], axis=1)
  np.testing.assert_array_equal(out, tokens[:, 5:])


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
  model = transformer.Model(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
  n = 6
  out = sample.generate(graphdef, nnx.to_pure_dict(params), prompt,
                        jax.random.key(0), max_new_tokens=n, temperature=0.0)
  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
  tokens = prompt
  for _ in range(n):
    logits = forward(params, tokens)
    tokens = jnp.concatenate([tokens, jnp.argmax(logits[:, -1:], -1)], axis=1)
  np.testing.assert_array_equal(out, tokens[:, 5:])
