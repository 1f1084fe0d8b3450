"""MLP, Transformer classifier and GAN: each trains through the shared step
functions to the same losses and parameters on any mesh as on one device."""
import jax
import ml_collections
import numpy as np
import pytest

from configs import classify_text, gan_digits, gan_mnist, mlp_digits
from conftest import assert_same_run, run_steps
MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)]


def _mlp():
  c = mlp_digits.get_config()
  c.model.update(width=32)
  return c


def _text():
  c = classify_text.get_config()
  c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                 max_len=16)
  c.data.seq_len = 16
  return c


def _gan_mlp():
  c = gan_digits.get_config()
  c.model.update(width=32, latent_dim=8)
  return c


def _gan_conv():
  c = gan_mnist.get_config()
  c.model.update(width=4, latent_dim=8)
  c.gan.r1_gamma = 1.0
  return c


FAMILIES = {"mlp": _mlp, "transformer_classifier": _text, "gan_mlp": _gan_mlp,
            "gan_dcgan": _gan_conv}


def _batches(config, steps: int, batch: int = 16) -> list[dict]:
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    if config.data.dataset == "shakespeare_genres":
      b = {"tokens": rng.integers(0, 256, (batch, config.data.seq_len))}
    else:
      shape = tuple(config.model.image_shape)
      b = {"image": rng.uniform(-1, 1, (batch, *shape)).astype(np.float32)}
    b["label"] = rng.integers(0, config.model.get("num_classes", 10), batch)
    out.append({k: v.astype(np.int32) if v.dtype == np.int64 else v
                for k, v in b.items()})
  return out


def train(config: ml_collections.ConfigDict, mesh_shape: dict, steps: int = 3,
          batches=None):
  """Steps on `mesh_shape` (a prefix of the 8 devices); (losses, state, setup)."""
  config.train.update(steps=steps, batch_size=16)
  return run_steps(config, mesh_shape, batches or _batches(config, steps))


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
  config = _mlp()
  config.model.dropout = 0.5
  _, state, setup = train(config, dict(data=1, fsdp=1, tensor=1), steps=1)
  from flax import nnx  # noqa: PLC0415
  model = nnx.merge(setup.graphdef, state.params)
  x = _batches(config, 1)[0]["image"]
  np.testing.assert_array_equal(model(x), model(x))
  k1, k2 = jax.random.split(jax.random.key(0))
  assert not np.allclose(model(x, dropout_key=k1), model(x, dropout_key=k2))


def test_gan_step_updates_both_networks():
  config = _gan_mlp()
  _, before, _ = train(config, dict(data=1, fsdp=1, tensor=1), steps=0,
                       batches=[])
  _, after, _ = train(_gan_mlp(), dict(data=1, fsdp=1, tensor=1), steps=1)
  for group in ("generator", "discriminator"):
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b),
                           before.params[group], after.params[group])
    assert all(jax.tree.leaves(changed)), group


def test_discriminator_learns_a_toy_distribution():
  """Real images are one bright square; the discriminator soon tells them
  from the generator's output, and its loss falls from log(4)."""
  config = _gan_mlp()
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
