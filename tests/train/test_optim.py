"""Optimizers, schedules and the weight-decay mask."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lm import config as config_lib
from lm.train import optim


def _cfg(**kw):
  """config.optimizer: the base config's, constant lr 0.1, then `kw`."""
  c = config_lib.base().optimizer
  c.update(learning_rate=0.1, schedule="constant", warmup_steps=0,
           weight_decay=0.0, grad_clip_norm=0.0)
  c.update(kw)
  return c


def _make(c, total_steps):
  return optim.make(c, total_steps, config_lib.base().prune)


@pytest.mark.parametrize("name", sorted(optim.UPDATE_RULES))
def test_every_optimizer_minimizes_a_quadratic(name):
  lr = {"sgd": 0.1, "momentum": 0.05, "adagrad": 0.5}.get(name, 0.05)
  tx, _ = _make(_cfg(name=name, learning_rate=lr), total_steps=200)
  target = jnp.arange(12.0).reshape(3, 4) / 10
  params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros((4,))}
  loss = lambda p: jnp.sum((p["w"] - target) ** 2) + jnp.sum((p["b"] - 1) ** 2)
  state = tx.init(params)
  start = loss(params)
  for _ in range(200):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < 0.05 * start, name


def test_weight_decay_skips_vectors():
  tx, _ = _make(_cfg(name="sgd", weight_decay=0.5), total_steps=10)
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)))
  np.testing.assert_array_equal(updates["scale"], 0.0)


def test_clipping_bounds_the_global_norm():
  tx, _ = _make(_cfg(name="sgd", learning_rate=1.0, grad_clip_norm=1.0),
                     total_steps=10)
  params = {"w": jnp.zeros((10,))}
  updates, _ = tx.update({"w": jnp.full((10,), 100.0)}, tx.init(params),
                         params)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-6)


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_clipping_equals_optax(scale):
  """Our clip (one multiply by a scalar) against optax.clip_by_global_norm
  (a divide per element), below, at and above the threshold."""
  k1, k2 = jax.random.split(jax.random.key(0))
  grads = {"w": jax.random.normal(k1, (7, 5)) * scale,
           "b": jax.random.normal(k2, (5,)) * scale}
  max_norm = float(optax.tree.norm(jax.tree.map(lambda g: g / scale, grads)))
  ours = optim.clip_by_global_norm(max_norm)
  theirs = optax.clip_by_global_norm(max_norm)
  got, _ = ours.update(grads, ours.init(grads))
  want, _ = theirs.update(grads, theirs.init(grads))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  if scale <= 1.0:  # Below the threshold: untouched, bit for bit.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(a, b)


def test_schedules():
  _, cos = _make(_cfg(schedule="cosine", warmup_steps=10,
                           end_learning_rate_fraction=0.1), total_steps=110)
  np.testing.assert_allclose([cos(0), cos(5), cos(10), cos(60), cos(110)],
                             [0.0, 0.05, 0.1, 0.055, 0.01], rtol=1e-5,
                             atol=1e-7)
  _, lin = _make(_cfg(schedule="linear", warmup_steps=10),
                      total_steps=110)
  np.testing.assert_allclose([lin(10), lin(60), lin(110)], [0.1, 0.05, 0.0],
                             atol=1e-7)
  _, const = _make(_cfg(), total_steps=110)
  assert float(const(0)) == float(const(100)) == pytest.approx(0.1)
