"""Attention maps (lm/explain/attention_maps.py): the probabilities the
model attends with, recomputed from each layer's q and k. Checked against
an independent recomputation in plain jnp from the layer's parameters
(embedding, RMSNorm, q/k projections with biases, RoPE, grouped-query heads,
the causal and same-segment masks, jax.nn.softmax); rows sum to 1 and
respect causality; the forward pass they come from gives the model's own
logits; a model sharded over data x fsdp x tensor gives one device's maps."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_reordered, tiny_config
from explain_models import random_model, random_params
from lm import config as config_lib
from lm.explain import attention_maps, forward
from lm.models import transformer, transformer_classifier
from lm.parallel import make_mesh, rules as rules_lib
from lm.train import state as state_lib

CFG = transformer.Config(vocab_size=64, max_len=24, d_model=32, n_layers=2,
                         n_heads=4, n_kv_heads=2, d_ff=64, qkv_bias=True)
EPS32 = float(np.finfo(np.float32).eps)


def _model(cls=transformer.Model, cfg=CFG):
  return random_model(cls, cfg)


def _tokens(b=2, length=14):
  return jax.random.randint(jax.random.key(1), (b, length), 0,
                            CFG.vocab_size)


def _rope(x_BxLxHxK, positions_BxL, base):
  """Rotate-half RoPE written out: pair (i, i + K/2) turns by position *
  base^(-i / (K/2))."""
  half = x_BxLxHxK.shape[-1] // 2
  freq_K2 = base ** (-np.arange(half) / half)
  angle_BxLx1xK2 = (positions_BxL[..., None, None]
                    * freq_K2[None, None, None].astype(np.float32))
  cos, sin = jnp.cos(angle_BxLx1xK2), jnp.sin(angle_BxLx1xK2)
  x1, x2 = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@jax.jit
def _first_layer_reference(model, tokens_BxL, positions_BxL, segments_BxL):
  """Layer 0's probs B x H x L x L from its parameters alone."""
  cfg, block = model.transformer.cfg, model.transformer.blocks[0]
  x_BxLxD = model.transformer.embedding[...][tokens_BxL]
  x_BxLxD = (x_BxLxD / jnp.sqrt(jnp.mean(x_BxLxD ** 2, -1, keepdims=True)
                                + cfg.norm_eps)
             * block.attn_norm.scale[...])
  q = jnp.einsum("bld,dhk->blhk", x_BxLxD, block.attn.q.kernel[...])
  k = jnp.einsum("bld,dnk->blnk", x_BxLxD, block.attn.k.kernel[...])
  q = _rope(q + block.attn.q.bias[...], positions_BxL, cfg.rope_base)
  k = _rope(k + block.attn.k.bias[...], positions_BxL, cfg.rope_base)
  groups = cfg.n_heads // cfg.n_kv_heads
  k = k[:, :, np.arange(cfg.n_heads) // groups]  # Head h reads h // G.
  scores_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(cfg.k)
  L = tokens_BxL.shape[1]
  allowed = (np.tril(np.ones((L, L), bool))[None, None]
             & (segments_BxL[:, None, :, None]
                == segments_BxL[:, None, None, :]))
  return jax.nn.softmax(jnp.where(allowed, scores_BxHxLxL, -jnp.inf), -1)


def test_first_layer_equals_an_independent_recomputation():
  """With grouped-query heads, q/k biases, RoPE at positions that restart
  in each packed document, the causal and the same-segment masks."""
  model = _model()
  tokens_BxL = _tokens()
  segments_BxL = jnp.asarray([[1] * 5 + [2] * 9, [1] * 14], jnp.int32)
  positions_BxL = jnp.asarray([list(range(5)) + list(range(9)),
                               list(range(14))], jnp.int32)
  probs = jax.jit(attention_maps.maps)(model, tokens_BxL, segments_BxL,
                                       positions_BxL)
  want = _first_layer_reference(model, tokens_BxL, positions_BxL,
                                segments_BxL)
  # A score sums K products of q and k, each a sum over D; a probability
  # moves by at most its score's error (softmax is 1-Lipschitz here).
  assert_reordered(probs[0], want, reduction=CFG.d_model * CFG.k)
  # Not a trivial map: the last query's probabilities differ.
  assert np.ptp(np.asarray(want)[1, :, -1]) > 0.01
  # Across the segment boundary of row 0: exactly nothing.
  assert not np.any(np.asarray(probs[0])[0, :, 5:, :5])


def test_rows_sum_to_one_and_respect_causality():
  """Every layer of the LM: each query's probabilities sum to 1 and none
  falls on a later key; the encoder classifier attends both ways."""
  L = 14
  for cls, cfg, causal in (
      (transformer.Model, CFG, True),
      (transformer_classifier.Model, transformer_classifier.Config(
          **{f.name: getattr(CFG, f.name) for f in
             dataclasses.fields(transformer.Config) if f.name != "causal"},
          num_classes=3), False)):
    probs = jax.jit(attention_maps.maps)(_model(cls, cfg), _tokens(length=L))
    assert len(probs) == cfg.n_layers
    for p_BxHxLxL in map(np.asarray, probs):
      assert p_BxHxLxL.shape == (2, cfg.n_heads, L, L)
      np.testing.assert_allclose(p_BxHxLxL.sum(-1), 1.0,
                                 atol=2 * EPS32 * np.sqrt(L))
      above = p_BxHxLxL[..., np.triu_indices(L, 1)[0],
                        np.triu_indices(L, 1)[1]]
      if causal:
        assert not above.any()
      else:
        assert above.min() > 0


@pytest.mark.parametrize("scan", [False, True])
def test_the_maps_come_from_the_models_own_forward_pass(scan):
  """The per-block forward the maps are read from ends in the model's
  logits (a block skipped, repeated or fed the wrong input would not),
  with the layers as a list or stacked for nnx.scan (sliced per layer)."""
  model = _model(cfg=dataclasses.replace(CFG, scan_layers=scan))
  tokens_BxL = _tokens()

  @jax.jit
  def both(model, tokens_BxL):
    h_BxLxD, _ = forward.run(model.transformer,
                             model.transformer.embed(tokens_BxL))
    return model.logits(h_BxLxD), model(tokens_BxL)[0]

  mine, want = both(model, tokens_BxL)
  assert_reordered(mine, want, reduction=CFG.d_ff)


def test_every_layer_attends_with_its_map():
  """Each layer's map times its values, through its output projection, is
  what the layer's own attention (the chunked implementation) outputs: a
  mask the model applies and the maps miss (a sliding window, say) fails
  here even where the plain recomputation above would not know it."""
  model = _model()
  tokens_BxL = _tokens()

  @jax.jit
  def per_layer(model, tokens_BxL):
    x_BxLxD = model.transformer.embed(tokens_BxL)
    positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]),
                                     tokens_BxL.shape)
    probs = attention_maps.maps(model, tokens_BxL)
    mine, want = [], []
    for block, probs_BxHxLxL in zip(model.transformer.blocks, probs):
      normed_BxLxD = block.attn_norm(x_BxLxD)
      _, _, v_BxLxNxK = block.attn.project(normed_BxLxD, positions_BxL)
      v_BxLxHxK = jnp.repeat(v_BxLxNxK, CFG.n_heads // CFG.n_kv_heads, 2)
      mine.append(block.attn.o(jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL,
                                          v_BxLxHxK)))
      want.append(block.attn(normed_BxLxD, positions_BxL, None, None)[0])
      x_BxLxD = block(x_BxLxD, positions_BxL)[0]
    return mine, want

  mine, want = per_layer(model, tokens_BxL)
  assert len(mine) == CFG.n_layers
  # Sums over the keys, then over H x K in the output projection.
  assert_reordered(mine, want, reduction=CFG.n_heads * CFG.k * 14)


def test_a_sharded_model_gives_one_devices_maps():
  """The same parameters sharded as training shards them on data=2 x
  fsdp=2 x tensor=2 (heads over tensor, weights over fsdp; the text's batch
  replicated, as the script runs it) and on one device."""
  config = tiny_config(**{"model.n_kv_heads": 2})
  config.mesh = dict(data=2, fsdp=2, tensor=2)
  config = config_lib.resolve(config)
  tokens_BxL = _tokens()
  with rules_lib.use(dataclasses.replace(rules_lib.Rules(), batch=None)):
    mesh = make_mesh(config.mesh, jax.devices())
    setup = state_lib.make_setup(config, mesh)
    params = random_params(setup.abstract_state.params)
    fn = jax.jit(lambda p, t: attention_maps.maps(
        nnx.merge(setup.graphdef, p), t))
    one = jax.device_get(fn(params, tokens_BxL))
    with jax.set_mesh(mesh):
      sharded = jax.device_put(params, setup.param_shardings)
      assert any(not a.sharding.is_fully_replicated
                 for a in jax.tree.leaves(sharded))
      many = jax.device_get(fn(sharded, tokens_BxL))
  cfg = setup.model_cfg
  # The reductions behind a probability: d_ff (the MLP) and D x K (a score).
  assert_reordered(many, one, reduction=max(cfg.d_ff, cfg.d_model * cfg.k))
