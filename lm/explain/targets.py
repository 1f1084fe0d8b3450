"""What integrated gradients attributes, per family: the score functions
f(batch of inputs) -> one score per row.

  LM (transformer)          log p(target token | the tokens up to and
                            including `position`), from the float32 logits
                            at `position`; the input is the token
                            embeddings B x L x D.
  text classifier           the class's logit (before the softmax, so a
                            confident prediction's attributions do not
                            vanish in its saturation); the input is the
                            token embeddings.
  MLP on images             the class's logit; the input is the pixels
                            B x H x W x C in [-1, 1].

The text baseline is a token's embedding at every position (the
end-of-document token's, as Captum's reference-token baselines use a pad
token), not the zero embedding: the blocks' first op is an RMSNorm, and
RMSNorm(a x) jumps from 0 at a = 0 to x / rms(x) by a ~ 1e-3 (its eps), so
from zero the path's gradient is a near-step that no quadrature with a
usable number of steps integrates (measured on a random tiny LM at 50
Gauss-Legendre steps: a completeness gap of 13 times f(x) - f(baseline)
from zero, 0.01% of it from the end-of-document token).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lm.explain import forward


def lm_log_prob(model, position: int, target) -> Callable:
  """f(x_BxLxD) = log p(target | embeddings up to `position`), B."""
  def f(x_BxLxD):
    h_BxLxD, _ = forward.run(model.transformer, x_BxLxD)
    # Only the position attributed goes through the LM head.
    logits_BxV = model.logits(h_BxLxD[:, position:position + 1])[:, 0]
    return jnp.take(jax.nn.log_softmax(logits_BxV), target, axis=-1)
  return f


def classifier_logit(model, target_class) -> Callable:
  """f(x_BxLxD) = the encoder classifier's logit of `target_class`, B."""
  def f(x_BxLxD):
    h_BxLxD, _ = forward.run(model.transformer, x_BxLxD)
    return jnp.take(model.classify(h_BxLxD), target_class, axis=-1)
  return f


def image_logit(model, target_class) -> Callable:
  """f(images_BxHxWxC) = the MLP's logit of `target_class`, B."""
  return lambda images: jnp.take(model(images), target_class, axis=-1)
