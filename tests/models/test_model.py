"""Model properties: causality, KV-cache decoding, scan/remat equivalence."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_reordered
from lm.models import transformer

CFG = transformer.Config(vocab_size=64, max_len=24, d_model=32, n_layers=2,
                         n_heads=4, n_kv_heads=2, d_ff=64)


def _tokens(b=2, length=16, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, length), 0,
                            CFG.vocab_size)


@pytest.mark.parametrize("scan", [False, True])
def test_changing_token_t_changes_no_logit_before_t(scan):
  model = transformer.Model(dataclasses.replace(CFG, scan_layers=scan),
                            nnx.Rngs(0))
  tokens = _tokens()
  t = 9
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.vocab_size)
  a, _ = model(tokens)
  b, _ = model(changed)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert not np.allclose(a[:, t:], b[:, t:]), "token t must matter from t on"


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_matches_full_forward(scan):
  model = transformer.Model(dataclasses.replace(CFG, scan_layers=scan),
                            nnx.Rngs(0))
  tokens = _tokens()
  full, _ = model(tokens)
  cache = model.init_cache(2, CFG.max_len)
  prefill, cache = model(tokens[:, :7], cache=cache, cache_index=0)
  steps = [prefill]
  for i in range(7, tokens.shape[1]):
    logits, cache = model(tokens[:, i:i + 1], cache=cache, cache_index=i)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5,
                             atol=1e-5)


def test_a_decode_step_writes_the_cache_in_place():
  """Unscanned layers keep one cache per layer, which a decode step whose
  cache is donated writes in place: every cache output aliases its input,
  the step's scratch memory is under half the cache's size, and no
  [layers, B, S, N, K] array is built. One stacked cache, sliced per layer
  and stacked again (the layout before), copied all of it every step:
  scratch above the cache's size."""
  cfg = dataclasses.replace(CFG, max_len=256, n_layers=4)
  model = transformer.Model(cfg, nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def step(params, cache, tokens_Bx1, index):
    return nnx.merge(graphdef, params)(tokens_Bx1, cache=cache,
                                       cache_index=index)
  B = 4
  cache = model.init_cache(B, cfg.max_len)
  compiled = jax.jit(step, donate_argnums=1).lower(
      params, cache, jnp.zeros((B, 1), jnp.int32), jnp.int32(7)).compile()
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
  memory = compiled.memory_analysis()
  assert memory.alias_size_in_bytes == cache_bytes
  assert memory.temp_size_in_bytes < cache_bytes / 2, memory
  stacked = f"[{cfg.n_layers},{B},{cfg.max_len},{cfg.n_kv_heads},{cfg.k}]"
  assert stacked not in compiled.as_text()


@pytest.mark.parametrize("scan", [False, True])
def test_a_cache_of_the_other_layout_is_refused(scan):
  model = transformer.Model(dataclasses.replace(CFG, scan_layers=scan),
                            nnx.Rngs(0))
  other = transformer.Model(dataclasses.replace(CFG, scan_layers=not scan),
                            nnx.Rngs(0)).init_cache(2, CFG.max_len)
  with pytest.raises(ValueError, match=f"scan_layers={scan}"):
    model(_tokens(), cache=other, cache_index=0)
  # stack_cache / unstack_cache convert between the two.
  cache = transformer.unstack_cache(model.cfg, transformer.stack_cache(other))
  assert jax.tree.structure(cache) == jax.tree.structure(
      model.init_cache(2, CFG.max_len))


def test_bidirectional_encoder_sees_the_future():
  model = transformer.Model(dataclasses.replace(CFG, causal=False),
                            nnx.Rngs(0))
  tokens = _tokens()
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % CFG.vocab_size)
  assert not np.allclose(model(tokens)[0][:, 0], model(changed)[0][:, 0])


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_changes_memory_not_gradients(policy):
  tokens = _tokens()

  def grads(cfg):
    model = transformer.Model(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(p):
      return nnx.merge(graphdef, p)(tokens)[0].mean()
    return jax.jit(jax.grad(loss))(params)

  for scan in (False, True):
    base = dataclasses.replace(CFG, scan_layers=scan)
    g0 = grads(base)
    g1 = grads(dataclasses.replace(base, remat=policy))
    # Remat recomputes the same math; XLA may fuse (and so sum) it in
    # another order. Longest sum: the batch's tokens times d_ff.
    assert_reordered(g1, g0, reduction=tokens.size * CFG.d_ff)


@pytest.mark.parametrize("policy,most", [
    ("full", 0.5), ("dots", 0.75), ("dots_no_batch", 0.75)])
def test_remat_lowers_the_compiled_temporaries(policy, most):
  """A remat policy must hold fewer activations, not only recompute them:
  XLA's temporaries of the gradient fall well below the no-remat ones.
  (Under plain jax.checkpoint XLA:CPU ran the recomputation during the
  forward pass and the two were equal; see tuning.remat.)"""
  cfg = dataclasses.replace(CFG, n_layers=4, d_ff=512, max_len=256)
  tokens = _tokens(b=4, length=256)

  def temporaries(remat):
    model = transformer.Model(dataclasses.replace(cfg, remat=remat),
                              nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(p):
      return nnx.merge(graphdef, p)(tokens)[0].mean()
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temporaries(policy) < most * temporaries("none")


def test_gqa_matches_mha_with_repeated_kv_heads():
  """GQA with N kv heads == MHA whose kv weights repeat each head H/N times."""
  gqa = transformer.Model(CFG, nnx.Rngs(0))
  mha = transformer.Model(dataclasses.replace(CFG, n_kv_heads=CFG.n_heads),
                          nnx.Rngs(0))
  group = CFG.n_heads // CFG.n_kv_heads
  _, gqa_state = nnx.split(gqa)
  _, mha_state = nnx.split(mha)
  p = nnx.to_pure_dict(gqa_state)
  for block in p["transformer"]["blocks"].values():
    for name in ("k", "v"):
      block["attn"][name]["kernel"] = jnp.repeat(block["attn"][name]["kernel"],
                                                 group, axis=1)
  nnx.update(mha, p)
  tokens = _tokens()
  np.testing.assert_allclose(mha(tokens)[0], gqa(tokens)[0], rtol=1e-5,
                             atol=1e-5)


def test_untied_head_and_gelu_build_and_run():
  cfg = dataclasses.replace(CFG, tie_embeddings=False, mlp="gelu")
  model = transformer.Model(cfg, nnx.Rngs(0))
  logits, _ = model(_tokens())
  assert logits.shape == (2, 16, CFG.vocab_size)
  assert logits.dtype == jnp.float32
  assert model.head.kernel.shape == (CFG.d_model, CFG.vocab_size)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  model = transformer.Model(cfg, nnx.Rngs(0))
  logits, _ = model(_tokens())
  assert logits.dtype == jnp.float32
  _, state = nnx.split(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))
