"""Magnitude pruning: schedule, exact layer-wise sparsity, masks that only
grow, parameter selection, sharded == unsharded, and an orbax round trip."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import config as config_lib
from lm.train import prune
from lm.train.checkpoint import Checkpointer

LR = 0.1
W0 = np.random.RandomState(0).normal(size=(16, 8)).astype(np.float32)
B0 = np.random.RandomState(1).normal(size=(8,)).astype(np.float32)
# Independent targets three times larger than the init: weights move far
# between prune steps, so pruned weights' gradients would pull them back and
# the magnitude ranking changes over time.
TARGET_W = 3 * np.random.RandomState(2).normal(size=(16, 8)).astype(np.float32)
TARGET_B = np.random.RandomState(3).normal(size=(8,)).astype(np.float32)
# begin 2, end 13, every 4: masks update at counts 2, 6, 10 and 13 (end; the
# schedule at 10 is 94 of 128 zeros, short of the final 96).
BEGIN, END, EVERY, FINAL = 2, 13, 4, 0.75
DUE = (2, 6, 10, 13)


def _params():
  return {"w": jnp.asarray(W0), "b": jnp.asarray(B0)}


def _loss(params):
  # Elementwise, so sharding w cannot change the order of any reduction in
  # the gradient: sharded and unsharded runs must agree bit for bit.
  return (0.5 * jnp.sum((params["w"] - TARGET_W)**2) +
          0.5 * jnp.sum((params["b"] - TARGET_B)**2))


def _step_fn(tx, **jit_kwargs):
  def step(params, state):
    updates, state = tx.update(jax.grad(_loss)(params), state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, **jit_kwargs)


def _run(tx, params, steps, state=None, step=None):
  """(params after each step as numpy, final params, final state)."""
  step = step or _step_fn(tx)
  state = tx.init(params) if state is None else state
  history = []
  for _ in range(steps):
    params, state = step(params, state)
    history.append(jax.tree.map(np.asarray, params))
  return history, params, state


def _tx(**kw):
  args = dict(begin_step=BEGIN, end_step=END, update_every=EVERY)
  return optax.chain(optax.sgd(LR),
                     prune.magnitude_prune(FINAL, **dict(args, **kw)))


def _hand_schedule(t, s_f, t0, t_end, s_i=0.0):
  if t < t0:
    return s_i
  if t >= t_end:
    return s_f
  return s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))**3


def test_target_sparsity_matches_the_cubic():
  kw = dict(final_sparsity=0.8, begin_step=10, end_step=30)
  for s_i in (0.0, 0.1):
    for t in (0, 9, 10, 13, 20, 29, 30, 31, 100):
      np.testing.assert_allclose(
          prune.target_sparsity(t, initial_sparsity=s_i, **kw),
          _hand_schedule(t, 0.8, 10, 30, s_i), rtol=1e-6, atol=1e-7)
  traced = jax.jit(lambda t: prune.target_sparsity(t, **kw))
  np.testing.assert_allclose(traced(jnp.int32(20)),
                             _hand_schedule(20, 0.8, 10, 30), rtol=1e-6)


def test_prunes_smallest_weights_to_exact_sparsity_and_never_regrows():
  pruned, _, _ = _run(_tx(), _params(), 20)
  plain, _, _ = _run(optax.sgd(LR), _params(), 20)
  zeros_before = np.zeros(W0.size, bool)
  for count, (p, q) in enumerate(zip(pruned, plain)):
    # Vectors are not pruned by default: b follows plain SGD exactly.
    np.testing.assert_array_equal(p["b"], q["b"])
    zeros = (p["w"] == 0.0).ravel()
    assert np.all(zeros[zeros_before]), f"a pruned weight came back at {count}"
    if count in DUE:
      expected = round(_hand_schedule(count, FINAL, BEGIN, END) * W0.size)
      assert zeros.sum() == expected, count
    else:
      assert zeros.sum() == zeros_before.sum(), count
    zeros_before = zeros
  # Nothing is pruned until the schedule asks for it (s = 0 at count 2). Not
  # bitwise: the extra select changes XLA's fusion (last-ulp differences).
  for count in range(6):
    np.testing.assert_allclose(pruned[count]["w"], plain[count]["w"],
                               rtol=1e-6, atol=1e-6)
  assert (pruned[-1]["w"] == 0).mean() == FINAL
  assert pruned[-1]["w"][pruned[END]["w"] == 0].tolist() == [0.0] * 96

  # The first real prune (count 6) removes exactly the smallest |w - lr*g|,
  # ranked here in float64 from the params before that step.
  w = pruned[5]["w"].astype(np.float64)
  new = w - LR * (w - TARGET_W)
  k = round(_hand_schedule(6, FINAL, BEGIN, END) * W0.size)
  smallest = np.argsort(np.abs(new).ravel(), kind="stable")[:k]
  assert set(np.flatnonzero(pruned[6]["w"] == 0)) == set(smallest)


def test_pruned_weights_stay_pruned_when_their_gradient_is_huge():
  tx = optax.chain(optax.sgd(1.0), prune.magnitude_prune(
      0.5, begin_step=0, end_step=4, update_every=1))

  @jax.jit
  def step(params, state):
    # Pushes every pruned weight far past every kept one: a ranking by
    # |params + updates| alone would bring them back at the next prune.
    grads = jnp.where(params["w"] == 0, -100.0, 0.01)
    updates, state = tx.update({"w": grads}, state, params)
    return optax.apply_updates(params, updates), state

  params = {"w": jnp.asarray(W0)}
  state = tx.init(params)
  zeros_before = np.zeros(W0.shape, bool)
  for count in range(6):
    params, state = step(params, state)
    zeros = np.asarray(params["w"]) == 0
    assert np.all(zeros[zeros_before]), count
    assert zeros.sum() == round(_hand_schedule(count, 0.5, 0, 4) * W0.size)
    zeros_before = zeros


def test_layer_patterns_select_parameters_and_are_checked():
  # nnx pure dicts key list entries with ints; paths join them with str.
  params = {"blocks": {0: {"mlp": {"kernel": jnp.asarray(W0)}},
                       1: {"mlp": {"kernel": jnp.asarray(W0)}}},
            "embed": jnp.asarray(W0), "unembed": jnp.asarray(W0),
            "b": jnp.asarray(B0)}
  # fullmatch: "embed" must not select "unembed".
  layers = (r"blocks/1/.*", "embed")
  tx = optax.chain(optax.sgd(LR), prune.magnitude_prune(
      0.5, begin_step=0, end_step=0, update_every=1, layers=layers))
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  after = optax.apply_updates(params, updates)
  assert prune.layer_sparsity(after, layers) == {
      "blocks/1/mlp/kernel": 0.5, "embed": 0.5}
  assert prune.overall_sparsity(after, layers) == 0.5
  for untouched in (after["blocks"][0]["mlp"]["kernel"], after["unembed"]):
    np.testing.assert_array_equal(untouched, W0 - LR)
  # Default selection: every ndim >= 2 parameter, no vectors.
  assert set(prune.layer_sparsity(after)) == {
      "blocks/0/mlp/kernel", "blocks/1/mlp/kernel", "embed", "unembed"}

  # fullmatch: a suffix alone matches nothing, and the error says which key.
  with pytest.raises(ValueError, match=r"config\.prune\.layers.*mlp/kernel"):
    prune.check_patterns(("mlp/kernel",), params)
  with pytest.raises(ValueError, match=r"config\.prune\.layers.*attn"):
    prune.magnitude_prune(0.5, begin_step=0, end_step=1, update_every=1,
                          layers=("attn/.*",)).init(params)
  prune.check_patterns((r"blocks/\d+/mlp/kernel", "embed"), params)


def test_invalid_arguments_name_the_config_key():
  ok = dict(begin_step=0, end_step=10, update_every=1)
  for bad in (1.0, -0.1):
    with pytest.raises(ValueError, match=r"config\.prune\.sparsity"):
      prune.magnitude_prune(bad, **ok)
  with pytest.raises(ValueError, match=r"config\.prune\.update_every"):
    prune.magnitude_prune(0.5, **dict(ok, update_every=0))
  with pytest.raises(ValueError, match=r"config\.prune\.end_step"):
    prune.magnitude_prune(0.5, **dict(ok, begin_step=11))
  with pytest.raises(ValueError, match=r"config\.prune\.layers"):
    prune.check_patterns(("(",), _params())


def test_from_config_defaults_end_to_three_quarters():
  cfg = config_lib.base().prune
  assert prune.from_config(cfg, 100) is None  # sparsity 0: off.
  cfg.update(sparsity=0.5, update_every=2)
  tx = optax.chain(optax.sgd(LR), prune.from_config(cfg, total_steps=8))
  history, _, _ = _run(tx, _params(), 8)
  zeros = [int((p["w"] == 0).sum()) for p in history]
  # end_step = 6: the ramp is still short of 64 of 128 at count 5.
  assert zeros[5] == round(_hand_schedule(4, 0.5, 0, 6) * 128) < 64
  assert zeros[6] == zeros[7] == 64


def _mesh_setup(tx):
  """Shardings exactly as lm/train/state.py derives them, and a sharded step."""
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  param_shardings = {"w": NamedSharding(mesh, P("data", None)),
                     "b": NamedSharding(mesh, P())}
  replicated = NamedSharding(mesh, P())
  abstract = jax.eval_shape(tx.init, _params())
  state_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract, param_shardings,
      transform_non_params=lambda _: replicated)
  shardings = (param_shardings, state_shardings)
  step = _step_fn(tx, in_shardings=shardings, out_shardings=shardings)
  return shardings, step


def test_sharded_run_equals_unsharded_and_masks_follow_params():
  tx = _tx()
  (param_shardings, state_shardings), step = _mesh_setup(tx)
  masks = state_shardings[1].masks
  assert masks["w"] == param_shardings["w"]
  assert masks["b"] == param_shardings["b"]
  assert state_shardings[1].count.spec == P()

  params = jax.device_put(_params(), param_shardings)
  state = jax.device_put(tx.init(_params()), state_shardings)
  sharded, _, state = _run(tx, params, 16, state, step)
  unsharded, _, _ = _run(tx, _params(), 16)
  for a, b in zip(sharded, unsharded):
    np.testing.assert_array_equal(a["w"], b["w"])
    np.testing.assert_array_equal(a["b"], b["b"])
  assert state[1].masks["w"].sharding == param_shardings["w"]
  assert (sharded[-1]["w"] == 0).mean() == FINAL


def test_orbax_round_trip_resumes_with_masks_and_zeros(tmp_path):
  tx = _tx()
  shardings, step = _mesh_setup(tx)
  params = jax.device_put(_params(), shardings[0])
  state = jax.device_put(tx.init(_params()), shardings[1])
  _, params, state = _run(tx, params, 7, state, step)  # Pruned once (at 6).
  saved = {"params": params, "opt_state": state}
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(7, saved)
  ckpt.wait()
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      saved)
  restored = ckpt.restore(abstract)
  ckpt.close()

  assert isinstance(restored["opt_state"][1], prune.PruneState)
  assert int(restored["opt_state"][1].count) == 7
  jax.tree.map(np.testing.assert_array_equal, restored, saved)
  resumed, _, _ = _run(tx, restored["params"], 9, restored["opt_state"], step)
  straight, _, _ = _run(tx, params, 9, state, step)
  for a, b in zip(resumed, straight):
    np.testing.assert_array_equal(a["w"], b["w"])
  zeros_at_save = np.asarray(params["w"]) == 0
  assert np.all(resumed[-1]["w"][zeros_at_save] == 0)
  assert (resumed[-1]["w"] == 0).mean() == FINAL


def test_pruned_run_resumes_exactly_and_stays_sparse(tmp_path, data_dir):
  """Through the trainer: a run stopped mid-pruning and resumed ends
  bit-identical to an uninterrupted one, at the exact sparsity, and the
  zeros chosen by the end step stay zero while training goes on."""
  from conftest import tiny_config  # noqa: PLC0415
  from lm.run import loop  # noqa: PLC0415

  def config():
    c = tiny_config(data_dir, mesh=dict(data=2, fsdp=2, tensor=2),
                    **{"prune.sparsity": 0.5, "prune.update_every": 1,
                       "prune.end_step": 3})
    c.train.update(steps=6, checkpoint_every=2, eval_every=6)
    return c

  whole = loop.train(config(), tmp_path / "whole")
  loop.train(config(), tmp_path / "split", stop_at_step=2)
  resumed = loop.train(config(), tmp_path / "split")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(whole["params"]),
               jax.device_get(resumed["params"]))
  layers = tuple(config().prune.layers)
  by_layer = prune.layer_sparsity(whole["params"], layers)
  assert by_layer and all(v == 0.5 for v in by_layer.values()), by_layer
  # Each eval logs the sparsity read from the parameters: a "sparsity" line
  # with the overall fraction and each pruned parameter's.
  with open(tmp_path / "whole" / "metrics.jsonl") as f:
    (line,) = [x for x in map(json.loads, f) if x["split"] == "sparsity"]
  assert line["step"] == 6 and line["overall"] == 0.5
  assert {k: line[k] for k in by_layer} == by_layer
  # The update with count == end_step (the 4th) applies the final masks.
  at_end = loop.train(config(), tmp_path / "at_end", stop_at_step=4)["params"]
  zeros_at_end = {k: np.asarray(v) == 0 for k, v in _flat(at_end).items()
                  if k in by_layer}
  zeros_final = {k: np.asarray(v) == 0
                 for k, v in _flat(whole["params"]).items() if k in by_layer}
  for k in zeros_at_end:
    np.testing.assert_array_equal(zeros_final[k], zeros_at_end[k], err_msg=k)


def _flat(params):
  return {jax.tree_util.keystr(p, simple=True, separator="/"): v
          for p, v in jax.tree_util.tree_leaves_with_path(params)}
