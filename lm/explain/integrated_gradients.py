"""Integrated gradients (Sundararajan et al., 2017), as Captum computes them.

For a scalar score f and an input x, with a baseline x' (the "absence" of
the input: a zero embedding, a black image),

  IG_i(x) = (x_i - x'_i) * integral_0^1 df/dx_i(x' + a (x - x')) da,

and by the fundamental theorem of calculus the attributions sum to
f(x) - f(x') (completeness). The integral is a quadrature over `steps`
points on the straight path; "gauss_legendre" (Captum's default rule, and
our default with Captum's default 50 steps) is exact for polynomials of
degree 2 steps - 1 and converges fast on the smooth functions these models
are (GELU, SiLU, softmax, norms). "trapezoid" is the Riemann trapezoid rule
(endpoints included), a baseline to compare against. How far the sum of
the attributions is from f(x) - f(x') (Captum's convergence delta) is
reported with every result: raise `steps` when it is large.

Shapes: P points on the path, and `...` any input shape.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

RULES = ("gauss_legendre", "trapezoid")
DEFAULT_RULE = "gauss_legendre"
DEFAULT_STEPS = 50


def nodes(steps: int, rule: str = DEFAULT_RULE
          ) -> tuple[np.ndarray, np.ndarray]:
  """(alphas P, weights P) of the rule on [0, 1]: the integral of g over
  [0, 1] is about sum(weights * g(alphas)); float64."""
  if steps < 2:
    raise ValueError(f"integrated gradients needs at least 2 steps; got "
                     f"{steps}.")
  if rule == "gauss_legendre":
    x_P, w_P = np.polynomial.legendre.leggauss(steps)  # On [-1, 1].
    return (x_P + 1) / 2, w_P / 2
  if rule == "trapezoid":
    alphas_P = np.linspace(0.0, 1.0, steps)
    w_P = np.full(steps, 1.0 / (steps - 1))
    w_P[[0, -1]] /= 2
    return alphas_P, w_P
  raise ValueError(f"unknown integration rule {rule!r}; use one of {RULES}.")


@dataclasses.dataclass(frozen=True)
class Result:
  attributions: np.ndarray  # The input's shape; float32.
  score: float  # f(x).
  baseline_score: float  # f(baseline).

  @property
  def gap(self) -> float:
    """Captum's convergence delta: sum(attributions) - (f(x) - f(x'))."""
    return float(np.sum(self.attributions, dtype=np.float64)
                 - (self.score - self.baseline_score))

  @property
  def relative_gap(self) -> float:
    """|gap| / |f(x) - f(x')| (inf when f(x) == f(x'))."""
    change = abs(self.score - self.baseline_score)
    return abs(self.gap) / change if change else float("inf")


def integrated_gradients(f: Callable[[jax.Array], jax.Array], x: jax.Array,
                         baseline: jax.Array, *, steps: int = DEFAULT_STEPS,
                         rule: str = DEFAULT_RULE, batch_size: int = 0
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(attributions in x's shape, f(x), f(baseline)), float32, traceable
  (jit it). `f` maps a batch P x x.shape to P scores, each row's score
  depending on that row alone (a model in inference). The path's points go
  through f `batch_size` at a time (0: all at once), Captum's
  internal_batch_size: memory against speed."""
  alphas_P, weights_P = nodes(steps, rule)
  batch = batch_size or steps
  chunks = -(-steps // batch)
  pad = chunks * batch - steps  # Padding points weigh nothing.
  alphas_CxB = np.pad(alphas_P, (0, pad)).reshape(chunks, batch)
  weights_CxB = np.pad(weights_P, (0, pad)).reshape(chunks, batch)
  x = x.astype(jnp.float32)
  baseline = jnp.broadcast_to(baseline, x.shape).astype(jnp.float32)
  delta = x - baseline
  # Rows are independent, so the gradient of the batch's total is each
  # row's own gradient.
  grad = jax.grad(lambda path_Px: jnp.sum(f(path_Px)))

  def chunk(total, alphas_weights_2xB):
    alphas_B, weights_B = alphas_weights_2xB[0], alphas_weights_2xB[1]
    shape = (-1,) + (1,) * x.ndim
    path_Bx = baseline[None] + alphas_B.reshape(shape) * delta[None]
    grads_Bx = grad(path_Bx)
    return total + jnp.tensordot(weights_B, grads_Bx, axes=1), None

  mean_grad, _ = jax.lax.scan(
      chunk, jnp.zeros_like(x),
      jnp.asarray(np.stack([alphas_CxB, weights_CxB], axis=1), jnp.float32))
  scores_2 = f(jnp.stack([x, baseline]))
  return delta * mean_grad, scores_2[0], scores_2[1]


def result(attributions, score, baseline_score) -> Result:
  """The host-side Result of integrated_gradients' outputs."""
  return Result(attributions=np.asarray(jax.device_get(attributions),
                                        np.float32),
                score=float(score), baseline_score=float(baseline_score))
