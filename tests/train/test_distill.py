"""Knowledge distillation: the loss against a hand computation, and a student
that trains with its frozen teacher in the same step on any mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from conftest import tiny_config
from lm import tasks
from lm.parallel import Rules, make_mesh, rules as rules_lib
from lm.run import loop, restore
from lm.train import distill, state as state_lib, step as step_lib


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_kd_loss_is_the_hand_computed_kl():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 3, 5))
  teacher = rng.normal(size=(2, 3, 5))
  t = 2.0
  p, q = _softmax(teacher / t), _softmax(student / t)
  kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1)  # Per row.
  expected = t * t * kl.mean()
  got = distill.kd_loss(jnp.asarray(student, jnp.float32),
                        jnp.asarray(teacher, jnp.float32), t)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  assert float(distill.kd_loss(jnp.asarray(teacher), jnp.asarray(teacher),
                               t)) == pytest.approx(0.0, abs=1e-6)


class _Logits(nnx.Module):
  """A stand-in model whose output is its parameter."""

  def __init__(self, logits):
    self.logits = nnx.Param(jnp.asarray(logits, jnp.float32))


def test_loss_mixes_hard_labels_and_teacher():
  rng = np.random.default_rng(1)
  student = rng.normal(size=(4, 6))
  teacher = rng.normal(size=(4, 6))
  labels = jnp.asarray([0, 5, 2, 3])

  def forward(model, batch, key):
    del batch, key
    return model.logits[...], labels

  graphdef, teacher_state = nnx.split(_Logits(teacher))
  fn = distill.loss_fn(forward, graphdef, teacher_state,
                       ConfigDict(dict(alpha=0.3, temperature=3.0)))
  loss, aux = fn(_Logits(student), {}, None)
  log_q = np.log(_softmax(student))
  hard = -np.mean(log_q[np.arange(4), np.asarray(labels)])
  p, q = _softmax(teacher / 3.0), _softmax(student / 3.0)
  soft = 9.0 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
  np.testing.assert_allclose(float(aux["hard_loss"]), hard, rtol=1e-5)
  np.testing.assert_allclose(float(aux["kd_loss"]), soft, rtol=1e-5)
  np.testing.assert_allclose(float(loss), 0.3 * hard + 0.7 * soft, rtol=1e-5)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data_dir):
  path = tmp_path_factory.mktemp("teacher")
  config = tiny_config(data_dir, mesh=dict(data=8, fsdp=1, tensor=1))
  config.train.steps = 4
  loop.train(config, path)
  return path


def _student(teacher_dir, mesh_shape, steps=3):
  config = tiny_config(**{"distill.teacher_workdir": str(teacher_dir),
                          "model.n_layers": 1, "model.d_model": 32,
                          "model.d_ff": 64})
  config.mesh = mesh_shape
  n = int(np.prod(list(mesh_shape.values())))
  mesh = make_mesh(mesh_shape, jax.devices()[:n])
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh), rules_lib.use(Rules()):
    setup = state_lib.make_setup(config, mesh)
    teacher = restore.load_teacher(config, mesh)
    fn = step_lib.jit_train_step(setup, tasks.get(config), 1, teacher)
    state = setup.init_fn(jax.random.key(0))
    history = []
    for _ in range(steps):
      tokens = rng.integers(0, 256, (16, 33)).astype(np.int32)
      state, m = fn(state, {"tokens": jax.device_put(
          tokens, setup.batch_sharding())})
      history.append(jax.device_get(m))
  return history, jax.device_get(state.params)


def test_student_trains_with_the_teacher_sharded_as_on_one_device(
    teacher_dir):
  ref_history, ref_params = _student(teacher_dir, dict(data=1, fsdp=1,
                                                        tensor=1))
  history, params = _student(teacher_dir, dict(data=2, fsdp=2, tensor=2))
  for key in ("loss", "hard_loss", "kd_loss", "grad_norm"):
    np.testing.assert_allclose([h[key] for h in history],
                               [h[key] for h in ref_history], rtol=1e-5,
                               err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-5),
               params, ref_params)
  for h in history:  # alpha = 0.5 by default.
    assert h["loss"] == pytest.approx(0.5 * h["hard_loss"] + 0.5 * h["kd_loss"],
                                      rel=1e-5)
    assert h["kd_loss"] > 0
