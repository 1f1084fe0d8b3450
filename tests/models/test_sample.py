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
