"""Integrated gradients (lm/explain/integrated_gradients.py, targets.py):
exact where the quadrature is exact, off by the trapezoid rule's known
error where it is not, and complete (attributions sum to f(x) - f(baseline)
within 1% at the documented default of 50 Gauss-Legendre steps) on the
LM's and the text classifier's targets."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from explain_models import random_model
from lm.explain import integrated_gradients as ig, targets
from lm.models import transformer, transformer_classifier

LM_CFG = transformer.Config(vocab_size=64, max_len=24, d_model=32,
                            n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
EPS32 = float(np.finfo(np.float32).eps)


def _cubic(w_N):
  """f(x) = sum_i w_i x_i^3 per row: the gradient along the path is a
  quadratic in alpha."""
  return lambda x_PxN: jnp.sum(w_N * x_PxN ** 3, axis=-1)


def test_exact_for_gauss_legendre_and_the_trapezoid_rules_own_error():
  """IG of sum(w x^3) from x' is w (x^3 - x'^3) exactly (completeness per
  coordinate); Gauss-Legendre integrates the quadratic path gradient
  exactly with any number of nodes >= 2, the trapezoid rule over-counts by
  exactly h^2 / 12 times its second derivative: w d^3 h^2 / 2 per
  coordinate (d = x - x', h = 1 / (steps - 1)). Chunking the path
  (batch_size, padded with zero-weight points) changes nothing."""
  rng = np.random.default_rng(0)
  w_N, x_N, base_N = (rng.uniform(-1, 1, 6).astype(np.float32)
                      for _ in range(3))
  f = _cubic(w_N)
  exact_N = w_N * (x_N ** 3 - base_N ** 3)
  d_N = x_N - base_N
  for steps, batch in ((2, 0), (7, 3), (50, 0), (50, 16)):
    attr, fx, fb = jax.jit(lambda x, b, s=steps, n=batch:
                           ig.integrated_gradients(f, x, b, steps=s,
                                                   batch_size=n))(x_N, base_N)
    # Sums of `steps` float32 terms of size about |w| max|x|^3 <= 1.
    np.testing.assert_allclose(attr, exact_N, rtol=0,
                               atol=4 * EPS32 * steps)
    np.testing.assert_allclose(fx - fb, exact_N.sum(), atol=8 * EPS32)
    trap, _, _ = ig.integrated_gradients(f, x_N, base_N, steps=steps,
                                         rule="trapezoid", batch_size=batch)
    h = 1 / (steps - 1)
    np.testing.assert_allclose(trap, exact_N + w_N * d_N ** 3 * h * h / 2,
                               rtol=0, atol=4 * EPS32 * steps)


def test_nodes_integrate_over_the_unit_interval():
  for rule in ig.RULES:
    alphas, weights = ig.nodes(ig.DEFAULT_STEPS, rule)
    assert alphas.min() >= 0 and alphas.max() <= 1
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)


def _complete(res: ig.Result):
  """Completeness within 1%, of a change large enough to mean something."""
  assert abs(res.score - res.baseline_score) > 1e-2, res
  assert res.relative_gap < 0.01, res


def _baseline(model, tokens_1xL):
  return model.transformer.embed(jnp.zeros_like(tokens_1xL))[0]


def test_complete_for_the_lms_next_token_log_prob():
  """Over the token embeddings from token 0's (the byte tokenizer's
  end-of-document token, the script's baseline); the tokens after
  the attributed position get exactly nothing (causality)."""
  model = random_model(transformer.Model, LM_CFG)
  tokens_1xL = jax.random.randint(jax.random.key(1), (1, 14), 1, 64)
  position = 9

  @jax.jit
  def attribute(model, tokens_1xL):
    x_LxD = model.transformer.embed(tokens_1xL)[0]
    f = targets.lm_log_prob(model, position, tokens_1xL[0, position + 1])
    return ig.integrated_gradients(f, x_LxD, _baseline(model, tokens_1xL))

  res = ig.result(*attribute(model, tokens_1xL))
  _complete(res)
  per_token_L = res.attributions.sum(-1)
  assert not per_token_L[position + 1:].any()
  assert np.all(per_token_L[:position + 1] != 0)
  # f(x) is the log-prob the model itself gives.
  want = jax.nn.log_softmax(model(tokens_1xL)[0][0, position])[
      tokens_1xL[0, position + 1]]
  np.testing.assert_allclose(res.score, want, rtol=0,
                             atol=4 * EPS32 * np.sqrt(LM_CFG.d_ff))


def test_complete_for_the_text_classifiers_class_logit():
  """Over the token embeddings; f(x) is the model's own logit. (The MLP's
  pixel attributions, from a black image, are checked complete on the
  script's run in test_explain_script.py.)"""
  cfg = transformer_classifier.Config(
      **{f.name: getattr(LM_CFG, f.name)
         for f in dataclasses.fields(transformer.Config)
         if f.name != "causal"}, num_classes=4)
  text = random_model(transformer_classifier.Model, cfg)
  tokens_1xL = jax.random.randint(jax.random.key(2), (1, 12), 1, 64)

  @jax.jit
  def text_ig(model, tokens_1xL):
    x_LxD = model.transformer.embed(tokens_1xL)[0]
    return ig.integrated_gradients(targets.classifier_logit(model, 2), x_LxD,
                                   _baseline(model, tokens_1xL))

  res = ig.result(*text_ig(text, tokens_1xL))
  _complete(res)
  np.testing.assert_allclose(res.score, text(tokens_1xL)[0, 2], rtol=0,
                             atol=4 * EPS32 * np.sqrt(cfg.d_ff))
