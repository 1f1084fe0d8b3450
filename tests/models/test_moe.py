"""Mixture-of-experts MLP: routing and capacity, aux losses, and expert
parallelism (sharded == single device, with the all_to_alls really there)."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lm.models import moe
from lm.parallel import Rules, make_mesh, use
from lm.parallel.rules import fit_spec

D, F, E = 16, 32, 8
BATCH = P(("data", "fsdp", "expert"))


def make(**overrides) -> tuple[nnx.GraphDef, dict]:
  # capacity_factor=E: C = top_k * T, more than any expert can receive.
  cfg = moe.Config(**{"experts": E, "capacity_factor": float(E), **overrides})
  model = moe.MoeMlp(cfg, D, F, dtype=jnp.float32, param_dtype=jnp.float32,
                     rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def sharded(mesh, graphdef, params, x):
  """params and x placed as the trainer places them (lm/train/state.py)."""
  logical = nnx.to_pure_dict(nnx.get_partition_spec(
      nnx.state(nnx.merge(graphdef, params))))
  shardings = jax.tree.map(
      lambda spec, a: NamedSharding(mesh, fit_spec(Rules().spec(spec),
                                                   a.shape, mesh)),
      logical, params, is_leaf=lambda s: isinstance(s, P))
  return (jax.device_put(params, shardings),
          jax.device_put(x, NamedSharding(mesh, BATCH)))


def mesh_of(shape):
  return make_mesh(shape, jax.devices()[:math.prod(shape.values())])


def forward(graphdef, params, x):
  # Jitted: op-by-op eager dispatch is several times slower here.
  return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)


def np_swiglu(x, p, e):
  h = x @ p["gate"][e]
  h = h / (1 + np.exp(-h)) * (x @ p["up"][e])
  return h @ p["down"][e]


def assert_close(a, b, rtol=1e-5):
  # atol for the few entries that cancel to about 0 (gradients mostly).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=rtol, atol=1e-6 * max(1.0, float(np.max(np.abs(b))))), a, b)


def test_equals_dense_reference_when_nothing_drops():
  graphdef, params = make(top_k=2)
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  y, aux = forward(graphdef, params, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x_TxD = np.asarray(x, np.float64).reshape(-1, D)
  logits = x_TxD @ p["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  top = np.argsort(-probs, axis=-1)[:, :2]
  gates = np.take_along_axis(probs, top, -1)
  gates /= gates.sum(-1, keepdims=True)
  every_TxExD = np.stack([np_swiglu(x_TxD, p, e) for e in range(E)], 1)
  want = np.einsum("tk,tkd->td", gates,
                   np.take_along_axis(every_TxExD, top[:, :, None], 1))
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-5,
                             atol=1e-6)
  assert float(aux["moe_dropped_fraction"]) == 0.0


def test_aux_losses_match_numpy():
  graphdef, params = make(top_k=2, z_loss=0.1, load_balance=0.3)
  x = jax.random.normal(jax.random.key(2), (2, 8, D))
  _, aux = forward(graphdef, params, x)
  logits = np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(
      params["router"], np.float64)
  lse = np.log(np.exp(logits).sum(-1))
  probs = np.exp(logits - lse[:, None])
  top = np.argsort(-probs, axis=-1)[:, :2]
  f = np.bincount(top.ravel(), minlength=E) / top.size
  z, lb = np.mean(lse ** 2), E * np.sum(f * probs.mean(0))
  np.testing.assert_allclose(aux["moe_z_loss"], z, rtol=1e-5)
  np.testing.assert_allclose(aux["moe_load_balance_loss"], lb, rtol=1e-5)
  np.testing.assert_allclose(aux["moe_aux_loss"], 0.1 * z + 0.3 * lb,
                             rtol=1e-5)


def forced(params, columns: dict[int, int]):
  """Router weights that read feature i into expert `columns[i]` only."""
  router = np.zeros_like(params["router"])
  for feature, expert in columns.items():
    router[feature, expert] = 2.0
  return {**params, "router": jnp.asarray(router)}


def test_drops_past_capacity_in_token_order():
  graphdef, params = make(experts=4, top_k=1, capacity_factor=1.0)
  params = forced(params, {0: 0})
  x = jnp.abs(jax.random.normal(jax.random.key(3), (2, 8, D)))  # All -> 0.
  y, aux = forward(graphdef, params, x)
  # T=16 tokens, C = ceil(1 * 1 * 16 / 4) = 4: tokens 0-3 stay.
  y_TxD = np.asarray(y).reshape(16, D)
  x_TxD = np.asarray(x).reshape(16, D)
  np.testing.assert_allclose(aux["moe_dropped_fraction"], 12 / 16)
  assert np.all(y_TxD[4:] == 0.0)
  np.testing.assert_allclose(y_TxD[:4], np_swiglu(
      x_TxD[:4], jax.tree.map(np.asarray, params), 0), rtol=1e-5, atol=1e-6)


def test_first_choices_before_second_choices():
  graphdef, params = make(experts=2, top_k=2, capacity_factor=0.5)
  params = forced(params, {0: 0, 1: 1})
  # Tokens 0-3 prefer expert 0 then 1; tokens 4-7 prefer 1 then 0.
  x_TxD = np.zeros((8, D), np.float32)
  x_TxD[:4, 0] = x_TxD[4:, 1] = 1.0
  x_TxD[:, 2:] = np.random.default_rng(0).normal(size=(8, D - 2))
  y, aux = forward(graphdef, params, jnp.asarray(x_TxD)[None])
  # C = ceil(0.5 * 2 * 8 / 2) = 4: all first choices fit, and fill both
  # experts, so every second choice drops. (Token-major order would drop
  # tokens 4-7 entirely instead.)
  np.testing.assert_allclose(aux["moe_dropped_fraction"], 0.5)
  p = jax.tree.map(np.asarray, params)
  first_gate = 1 / (1 + np.exp(-2.0))  # Renormalized over both choices.
  want = np.concatenate([np_swiglu(x_TxD[:4], p, 0),
                         np_swiglu(x_TxD[4:], p, 1)]) * first_gate
  np.testing.assert_allclose(np.asarray(y)[0], want, rtol=1e-5, atol=1e-6)


def test_capacity_is_per_expert_shard():
  graphdef, params = make(experts=4, top_k=1, capacity_factor=1.0)
  params = forced(params, {0: 0})
  x = jnp.abs(jax.random.normal(jax.random.key(3), (2, 8, D)))
  mesh = mesh_of(dict(expert=2))
  with jax.set_mesh(mesh), use(Rules()):
    p, xs = sharded(mesh, graphdef, params, x)
    y, aux = forward(graphdef, p, xs)
  # One group per shard (one row, T=8): C = ceil(8 / 4) = 2 per row.
  np.testing.assert_allclose(aux["moe_dropped_fraction"], 12 / 16)
  kept = np.any(np.asarray(y) != 0, axis=-1)
  np.testing.assert_array_equal(kept, [[1, 1] + [0] * 6] * 2)


def loss_and_grads(graphdef, params, x, mesh=None):
  cot = jax.random.normal(jax.random.key(9), x.shape)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params)(x)
    return jnp.sum(y * cot) + aux["moe_aux_loss"], (y, aux)

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh is None:
    return f(params, x)
  with jax.set_mesh(mesh), use(Rules()):
    return f(*sharded(mesh, graphdef, params, x))


@pytest.mark.parametrize("shape", [
    dict(expert=2), dict(expert=4), dict(expert=8),
    dict(data=2, expert=2, tensor=2), dict(fsdp=2, expert=4)], ids=str)
def test_sharded_equals_single_device(shape):
  graphdef, params = make(top_k=2)
  x = jax.random.normal(jax.random.key(4), (8, 4, D))
  want = loss_and_grads(graphdef, params, x)
  got = loss_and_grads(graphdef, params, x, mesh_of(shape))
  assert float(got[0][1][1]["moe_dropped_fraction"]) == 0.0
  assert_close(got, want)


def test_forward_exchanges_tokens_with_two_all_to_alls():
  graphdef, params = make(top_k=2)
  x = jax.random.normal(jax.random.key(4), (8, 4, D))
  mesh = make_mesh(dict(expert=4, data=2))
  with jax.set_mesh(mesh), use(Rules()):
    p, xs = sharded(mesh, graphdef, params, x)
    hlo = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)).lower(
        p, xs).compile().as_text()
  assert len(re.findall(r" all-to-all\(", hlo)) == 2  # Dispatch, combine.
  # Groups are device-local: tokens are never gathered over data.
  assert " all-gather(" not in hlo


def test_adam_steps_sharded_equal_single_device():
  graphdef, params = make(top_k=2)
  x = jax.random.normal(jax.random.key(5), (8, 4, D))
  tx = optax.adam(1e-2)

  def train(params, x):
    def loss(params):
      y, aux = nnx.merge(graphdef, params)(x)
      return jnp.sum(y * y) + aux["moe_aux_loss"]

    opt_state = tx.init(params)
    for _ in range(3):
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
      params = optax.apply_updates(params, updates)
    return params

  want = jax.jit(train)(params, x)
  mesh = make_mesh(dict(expert=4, data=2))
  with jax.set_mesh(mesh), use(Rules()):
    got = jax.jit(train)(*sharded(mesh, graphdef, params, x))
  assert_close(got, want)


def test_bfloat16_compute_trains_under_expert_parallelism():
  # The weights' gradients are summed over token shards in the shard_map's
  # transpose; a bfloat16 all-reduce there aborts XLA:CPU, so they must be
  # cast to the compute dtype inside it.
  cfg = moe.Config(experts=E, capacity_factor=float(E))
  model = moe.MoeMlp(cfg, D, F, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                     rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  x = jax.random.normal(jax.random.key(4), (8, 4, D))
  (_, (y, _)), grads = loss_and_grads(graphdef, params, x,
                                      make_mesh(dict(expert=4, data=2)))
  _, params32 = make()
  (_, (y32, _)), grads32 = loss_and_grads(make()[0], params32, x)
  assert y.dtype == jnp.bfloat16
  for g, g32 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32)):
    assert g.dtype == g32.dtype
    assert np.linalg.norm(g - g32) < 0.05 * np.linalg.norm(g32)
