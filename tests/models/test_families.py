"""MLP, Transformer classifier and GAN: each trains through the shared step
functions to the same losses and parameters on any mesh as on one device."""
import jax
import numpy as np
import pytest

from conftest import FAMILIES, assert_same_run, family_batches as _batches
from conftest import train_family as train

MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
  make = FAMILIES[request.param]
  single = train(make(), dict(data=1, fsdp=1, tensor=1))
  return make, single


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_sharded_equals_single_device(family, mesh_shape):
  make, (ref_history, ref_state, _) = family
  history, state, _ = train(make(), mesh_shape)
  assert_same_run(history, state, ref_history, ref_state)


def test_dropout_is_active_in_training_only():
  config = FAMILIES["mlp"]()
  config.model.dropout = 0.5
  _, state, setup = train(config, dict(data=1, fsdp=1, tensor=1), steps=1)
  from flax import nnx  # noqa: PLC0415
  model = nnx.merge(setup.graphdef, state.params)
  x = _batches(config, 1)[0]["image"]
  np.testing.assert_array_equal(model(x), model(x))
  k1, k2 = jax.random.split(jax.random.key(0))
  assert not np.allclose(model(x, dropout_key=k1), model(x, dropout_key=k2))


def test_gan_step_updates_both_networks():
  config = FAMILIES["gan_mlp"]()
  _, before, _ = train(config, dict(data=1, fsdp=1, tensor=1), steps=0,
                       batches=[])
  _, after, _ = train(FAMILIES["gan_mlp"](), dict(data=1, fsdp=1, tensor=1), steps=1)
  for group in ("generator", "discriminator"):
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b),
                           before.params[group], after.params[group])
    assert all(jax.tree.leaves(changed)), group


def test_discriminator_learns_a_toy_distribution():
  """Real images are one bright square; the discriminator soon tells them
  from the generator's output, and its loss falls from log(4)."""
  config = FAMILIES["gan_mlp"]()
  config.gan.r1_gamma = 0.0
  config.optimizer.learning_rate = 1e-3
  real = -np.ones((16, 8, 8, 1), np.float32)
  real[:, 2:6, 2:6] = 1.0
  batches = [{"image": real, "label": np.zeros(16, np.int32)}] * 20
  history, _, _ = train(config, dict(data=2, fsdp=2, tensor=2), steps=20,
                        batches=batches)
  assert history[0]["d_loss"] == pytest.approx(np.log(4.0), abs=0.2)
  assert history[-1]["d_loss"] < history[0]["d_loss"] - 0.3
  assert history[-1]["d_real"] > 0.5 > history[-1]["d_fake"]
  # The generator's loss rises as the discriminator wins.
  assert history[-1]["g_loss"] > history[0]["g_loss"]
