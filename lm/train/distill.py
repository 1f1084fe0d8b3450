"""Knowledge distillation (Hinton et al. 2015) from a frozen teacher run.

config.distill.teacher_workdir names a finished run of the same task; its
latest parameters are restored onto the student's mesh (sharded by its own
logical names) and passed to the jitted train step as an argument, so the
teacher's forward pass runs in the same step, on the same devices, with no
gradient. The student's loss is

  alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_T(teacher) || p_T(student))

where p_T = softmax(logits / T); the T^2 keeps the soft term's gradient scale
independent of T. Evaluation reports the student's plain cross-entropy.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm import paths
from lm.train import checkpoint as ckpt_lib
from lm.train import state as state_lib


def enabled(config) -> bool:
  distill = config.get("distill", None)
  return bool(distill is not None and distill.get("teacher_workdir", ""))


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
            temperature: float) -> jax.Array:
  """T^2 * mean over rows of KL(softmax(teacher/T) || softmax(student/T)),
  float32; the class axis is the last."""
  t = jnp.asarray(temperature, jnp.float32)
  s_log = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  t_log = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(t_log) * (t_log - s_log), axis=-1)
  return t * t * kl.mean()


# forward(model, batch, key) -> (logits ... x C, integer labels ...).
Forward = Callable[..., tuple[jax.Array, jax.Array]]


def loss_fn(forward: Forward, teacher_graphdef, teacher_params, distill_cfg):
  """A loss_fn(model, batch, key) for lm/train/step.py that mixes the hard
  labels with the teacher's softened predictions."""
  alpha = float(distill_cfg.get("alpha", 0.5))
  temperature = float(distill_cfg.get("temperature", 2.0))

  def fn(model, batch: dict, key):
    logits, labels = forward(model, batch, key)
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    teacher_logits, _ = forward(teacher, batch, None)  # No dropout.
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    hard = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
    soft = kd_loss(logits, teacher_logits, temperature)
    return alpha * hard + (1 - alpha) * soft, {"hard_loss": hard,
                                               "kd_loss": soft}
  return fn


@dataclasses.dataclass(frozen=True)
class Teacher:
  graphdef: nnx.GraphDef
  params: Any  # Sharded on the student's mesh.
  shardings: Any
  step: int


def load_teacher(config, mesh, rules=None) -> Teacher:
  """Restores the teacher's latest parameters onto `mesh` (the student's)."""
  from lm import restore  # noqa: PLC0415  (restore imports the trainer.)
  workdir = paths.resolve(config.distill.teacher_workdir)
  teacher_config = restore.load_config(workdir)
  with teacher_config.unlocked():
    teacher_config.mesh = dict(config.mesh)
  setup = state_lib.make_setup(teacher_config, mesh, rules)
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints")
  try:
    step = ckpt.latest_step()
    state = ckpt.restore(setup.abstract_state)
  finally:
    ckpt.close()
  return Teacher(graphdef=setup.graphdef, params=state.params,
                 shardings=setup.param_shardings, step=step)
