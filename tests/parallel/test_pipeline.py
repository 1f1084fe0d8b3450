"""GPipe over the `stage` axis equals the plain sequential layer loop, in
outputs, gradients and optimizer steps, on real (scanned) Transformer blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lm.models import transformer
from lm.parallel import mesh as mesh_lib
from lm.parallel import pipeline
from lm.parallel import rules as rules_lib

N_LAYERS, B, L, D = 4, 8, 8, 32


def assert_close(actual, desired, rtol=1e-5):
  """Elementwise rtol, plus rtol times the tensor's largest magnitude as atol:
  float32 sums in another order (microbatched, sharded) differ by ~1e-7 of
  the scale of the tensor, which an element that cancels to ~0 cannot meet
  relative to itself."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(actual, desired, rtol=rtol,
                             atol=rtol * float(np.max(np.abs(desired))))


def _blocks():
  """(layer_fn, stacked params as a pure dict, logical specs) of real blocks."""
  # max_len covers the strided positions of _inputs (up to B x L): RoPE's
  # sin/cos table has max_len rows.
  cfg = transformer.Config(vocab_size=64, max_len=B * L, d_model=D,
                           n_layers=N_LAYERS, n_heads=4, n_kv_heads=2, d_ff=64,
                           scan_layers=True)
  model = transformer.Model(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(model.transformer.blocks)
  # The stacked blocks' graphdef merged with one layer's slice is one Block
  # (what nnx.scan does inside).
  layer_fn = lambda p, x, pos: nnx.merge(graphdef, p)(x, pos)[0]  # noqa: E731
  logical = nnx.to_pure_dict(nnx.get_partition_spec(state))
  return layer_fn, nnx.to_pure_dict(state), logical


LAYER_FN, PARAMS, LOGICAL = _blocks()


def _inputs():
  x_BxLxD = jax.random.normal(jax.random.key(1), (B, L, D))
  # A different position stride per row, so a microbatch paired with another
  # one's positions changes the output (RoPE ignores a per-row offset).
  pos_BxL = (jnp.arange(L)[None, :] * (1 + jnp.arange(B)[:, None])).astype(
      jnp.int32)
  return x_BxLxD, pos_BxL


def _sequential(params, x_BxLxD, pos_BxL):
  for i in range(N_LAYERS):
    x_BxLxD = LAYER_FN(jax.tree.map(lambda a: a[i], params), x_BxLxD, pos_BxL)
  return x_BxLxD


def _loss_fn(apply):
  """Sum of the output times a fixed random tensor (not symmetric in rows,
  so swapped microbatches change the gradients): returns (loss, y)."""
  r_BxLxD = jax.random.normal(jax.random.key(2), (B, L, D))

  def loss(params, x_BxLxD, pos_BxL):
    y_BxLxD = apply(params, x_BxLxD, pos_BxL)
    return jnp.sum(y_BxLxD * r_BxLxD), y_BxLxD
  return loss


def _value_and_grads(apply, params, x_BxLxD, pos_BxL):
  grad = jax.value_and_grad(_loss_fn(apply), argnums=(0, 1), has_aux=True)
  (_, y_BxLxD), grads = jax.jit(grad)(params, x_BxLxD, pos_BxL)
  return y_BxLxD, grads


REFERENCE = _value_and_grads(_sequential, PARAMS, *_inputs())


def _shard(mesh, params, x_BxLxD, pos_BxL):
  """Places params and inputs as the trainer would: through the rules."""
  rules = rules_lib.Rules()
  params = jax.tree.map(
      lambda spec, a: jax.device_put(a, NamedSharding(
          mesh, rules_lib.fit_spec(rules.spec(spec), a.shape, mesh))),
      LOGICAL, params, is_leaf=lambda s: isinstance(s, P))
  x_BxLxD = jax.device_put(x_BxLxD, NamedSharding(
      mesh, rules("batch", "length", "act_embed")))
  pos_BxL = jax.device_put(pos_BxL, NamedSharding(
      mesh, rules("batch", "length")))
  return params, x_BxLxD, pos_BxL


def _check_against_reference(mesh_shape, microbatches, remat=True):
  mesh = mesh_lib.make_mesh(mesh_shape)
  apply = lambda p, x, pos: pipeline.gpipe(  # noqa: E731
      LAYER_FN, p, x, pos, microbatches=microbatches, remat=remat)
  with jax.set_mesh(mesh):
    y_BxLxD, grads = _value_and_grads(apply, *_shard(mesh, PARAMS, *_inputs()))
  ref_y_BxLxD, ref_grads = REFERENCE
  assert_close(y_BxLxD, ref_y_BxLxD)
  jax.tree.map(assert_close, grads, ref_grads)


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("microbatches", [1, 2, 4])
def test_gpipe_equals_sequential(stages, microbatches):
  _check_against_reference(dict(data=8 // stages, stage=stages),
                           microbatches)


@pytest.mark.parametrize("mesh_shape", [
    dict(data=2, stage=2, tensor=2),
    dict(stage=2, fsdp=2, tensor=2),
], ids=str)
def test_gpipe_on_combined_meshes(mesh_shape):
  _check_against_reference(mesh_shape, microbatches=2)


def test_gpipe_without_remat():
  _check_against_reference(dict(data=4, stage=2), microbatches=2, remat=False)


def test_gpipe_without_stage_axis_scans_all_layers():
  y_BxLxD = jax.jit(lambda p, x, pos: pipeline.gpipe(
      LAYER_FN, p, x, pos, microbatches=2))(PARAMS, *_inputs())
  assert_close(y_BxLxD, REFERENCE[0])


def test_gpipe_rejects_indivisible_shapes():
  with jax.set_mesh(mesh_lib.make_mesh(dict(data=4, stage=2))):
    with pytest.raises(ValueError, match="microbatches=3"):
      pipeline.gpipe(LAYER_FN, PARAMS, *_inputs(), microbatches=3)
  with jax.set_mesh(mesh_lib.make_mesh(dict(stage=8))):
    with pytest.raises(ValueError, match="n_layers=4"):
      pipeline.gpipe(LAYER_FN, PARAMS, *_inputs(), microbatches=2)


def test_bubble_fraction():
  # 4 stages, 8 microbatches: 11 ticks, of which each stage idles 3.
  assert pipeline.bubble_fraction(4, 8) == pytest.approx(3 / 11)
  assert pipeline.bubble_fraction(2, 1) == pytest.approx(1 / 2)
  assert pipeline.bubble_fraction(1, 4) == 0.0


def _train(apply, params, x_BxLxD, pos_BxL, steps=3):
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    loss = lambda p: jnp.sum(apply(p, x_BxLxD, pos_BxL) ** 2)  # noqa: E731
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params


def test_adam_steps_equal_single_device():
  ref = _train(_sequential, PARAMS, *_inputs())
  mesh = mesh_lib.make_mesh(dict(data=4, stage=2))
  with jax.set_mesh(mesh):
    params = _train(lambda p, x, pos: pipeline.gpipe(
        LAYER_FN, p, x, pos, microbatches=2),
        *_shard(mesh, PARAMS, *_inputs()))
  jax.tree.map(assert_close, params, ref)
  # The steps moved the params well beyond the tolerance.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       ref, PARAMS)
  assert min(jax.tree.leaves(moved)) > 1e-3


def test_idle_ticks_skip_the_layers():
  # A mesh of `stage` alone: jax.debug.callback under a shard_map with other
  # (automatic) mesh axes fails inside jax 0.10 (axis_index(*auto_axes)).
  mesh = jax.make_mesh((2,), ("stage",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,))
  calls = []

  def layer_fn(w_DxD, x_bxD, extra_b):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.tanh(x_bxD @ w_DxD) + extra_b[:, None]

  w_NxDxD = jnp.full((N_LAYERS, 8, 8), 0.1)
  x_BxD, extra_B = jnp.ones((B, 8)), jnp.arange(B, dtype=jnp.float32)
  microbatches = 4
  with jax.set_mesh(mesh):
    y_BxD = jax.jit(lambda w, x, e: pipeline.gpipe(
        layer_fn, w, x, e, microbatches=microbatches))(w_NxDxD, x_BxD, extra_B)
    jax.block_until_ready(y_BxD)
    jax.effects_barrier()
  # Each layer runs once per microbatch; running the bubble's S - 1 idle
  # ticks too would make it (M + S - 1) * n_layers.
  assert len(calls) == microbatches * N_LAYERS
