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

from lm import checks


def enabled(config) -> bool:
  return bool(config.distill.teacher_workdir)


def check(distill_cfg) -> None:
  """config.distill's own values (whether the teacher run fits the student
  spans sections: lm/run/checks.py). Raises ConfigError."""
  checks.require(0.0 <= distill_cfg.alpha <= 1.0,
                 f"config.distill.alpha={distill_cfg.alpha} must be in "
                 "[0, 1].")
  checks.require(distill_cfg.temperature > 0,
                 f"config.distill.temperature={distill_cfg.temperature} must "
                 "be positive.")


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
  alpha = float(distill_cfg.alpha)
  temperature = float(distill_cfg.temperature)

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
  """A frozen teacher on the student's mesh (loaded by lm/run/restore.py)."""
  graphdef: nnx.GraphDef
  params: Any  # Sharded on the student's mesh.
  shardings: Any
  step: int
