"""Pure step functions and their jitted forms.

A task (lm/tasks/) supplies the loss or the whole train step; this file owns
what every task shares: per-step random keys, gradient accumulation, the
optimizer update and the jit with explicit shardings and donation.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.parallel import constrain, reduce as reduce_lib
from lm.train import lora, precision, privacy
from lm.train.state import Setup, TrainState

# loss_fn(model, batch, key) -> (scalar float32 loss, dict of scalar metrics).
LossFn = Callable[..., tuple[jax.Array, dict]]


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The step's randomness (dropout, GAN latents): a pure function of the
  seed and the step, so a resumed run draws what the uninterrupted one did."""
  return jax.random.fold_in(jax.random.key(seed + 1), step)


def _microbatches(batch: dict, accum_steps: int) -> dict:
  """Microbatch i takes rows i, i+A, i+2A, ...: every device keeps its own
  rows, so splitting the batch moves no data between devices."""
  def split(x):
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
    return x.swapaxes(0, 1)
  return jax.tree.map(split, batch)


def grads(loss_fn: LossFn, params, graphdef, batch: dict, key: jax.Array,
          accum_steps: int = 1,
          loss_scale: precision.LossScale | None = None, frozen=None,
          dropout: bool = False):
  """((loss, metrics), grads) of the batch mean, accumulated over
  `accum_steps` equal microbatches when asked (the gradients of a scaled loss
  come back unscaled). LoRA: `params` are the adapters, `frozen` the base
  they are merged with (no gradient: it is not an argument of the
  differentiated function); `dropout`: the graph drops the adapters' inputs,
  with the (micro)batch's key."""
  def loss_of(p, b, k):
    if frozen is None:
      return loss_fn(nnx.merge(graphdef, p), b, k)
    return loss_fn(lora.merge_model(graphdef, p, frozen,
                                    k if dropout else None), b, k)

  grad_fn = precision.value_and_grad(loss_of, loss_scale, has_aux=True)
  if accum_steps == 1:
    return grad_fn(params, batch, key)

  def body(carry, xs):
    i, micro = xs
    micro = {k: constrain(v, "batch", *([None] * (v.ndim - 1)))
             for k, v in micro.items()}
    (loss, metrics), g = grad_fn(params, micro, jax.random.fold_in(key, i))
    return jax.tree.map(jnp.add, carry, ((loss, metrics), g)), None

  micro = _microbatches(batch, accum_steps)
  out_shapes = jax.eval_shape(grad_fn, params,
                              jax.tree.map(lambda x: x[0], micro), key)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes)
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
  # Equal-sized microbatches: the mean of means is the full-batch mean.
  return jax.tree.map(lambda x: x / accum_steps, total)


def apply_gradients(tx, g, opt_state, params):
  """One optimizer update: (new params, new optimizer state)."""
  updates, opt_state = tx.update(g, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def supervised_train_step(state: TrainState, batch: dict, *, setup: Setup,
                          loss_fn: LossFn, accum_steps: int = 1
                          ) -> tuple[TrainState, dict]:
  key = step_key(setup.seed, state.step)
  scale = state.loss_scale

  def grad_fn(params, batch, key):
    if setup.frozen is None:
      return grads(loss_fn, params, setup.graphdef, batch, key, accum_steps,
                   scale)
    return grads(loss_fn, params, setup.train_graphdef or setup.graphdef,
                 batch, key, accum_steps, scale, frozen=setup.frozen,
                 dropout=setup.train_graphdef is not None)

  mode, dtype = setup.grad_reduce
  if setup.privacy is not None:  # DP-SGD (checked: no LoRA, no float16).
    (loss, metrics), g = privacy.noisy_grads(
        loss_fn, state.params, setup.graphdef, batch, key, setup.privacy,
        accum_steps, setup.param_shardings)
  elif mode != "auto" and setup.mesh.shape["data"] > 1:
    (loss, metrics), g = reduce_lib.explicit_grads(
        grad_fn, state.params, batch, key, mesh=setup.mesh, dtype=dtype,
        mode=mode)
  else:
    (loss, metrics), g = grad_fn(state.params, batch, key)
  params, opt_state = apply_gradients(setup.tx, g, state.opt_state,
                                      state.params)
  if scale is not None:  # float16: skip a step whose gradients overflowed.
    finite = precision.all_finite(g)
    params, opt_state = precision.select(
        finite, (params, opt_state), (state.params, state.opt_state))
    scale = scale.adjust(finite)
  metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(g),
             "learning_rate": setup.schedule(state.step),
             **precision.metrics(scale)}
  return state.replace(step=state.step + 1, params=params,
                       opt_state=opt_state, loss_scale=scale), metrics


@dataclasses.dataclass(frozen=True)
class Bound:
  """A jitted function with trailing arguments bound (a distillation
  teacher's parameters, the eval step's extra inputs): call it, or lower it
  for cost analysis, with the leading arguments only."""
  jitted: Any
  bound: tuple = ()

  def __call__(self, *args):
    return self.jitted(*args, *self.bound)

  def lower(self, *args):
    return self.jitted.lower(*args, *self.bound)


def jit_train_step(setup: Setup, task, accum_steps: int = 1,
                   teacher=None, frozen=None) -> Bound:
  """(state, batch) -> (state, metrics), state donated. The batch keeps the
  sharding `loop.global_batch` gave it. A distillation `teacher`
  (lm/train/distill.py) enters as an argument with its own shardings, so its
  parameters are neither donated nor baked into the program; so does a LoRA
  run's `frozen` base (lm/train/lora.py)."""
  out_shardings = (setup.state_shardings, setup.replicated())
  if frozen is not None:
    def fn_with_base(state, batch, frozen):
      return task.train_step(
          state, batch, setup=dataclasses.replace(setup, frozen=frozen),
          accum_steps=accum_steps)

    jitted = jax.jit(fn_with_base, in_shardings=(
        setup.state_shardings, None, setup.frozen_shardings),
                     out_shardings=out_shardings, donate_argnums=(0,))
    return Bound(jitted, (frozen,))
  if teacher is None:
    fn = functools.partial(task.train_step, setup=setup,
                           accum_steps=accum_steps)
    return Bound(jax.jit(fn, in_shardings=(setup.state_shardings, None),
                         out_shardings=out_shardings, donate_argnums=(0,)))

  def fn_with_teacher(state, batch, teacher_params):
    return task.train_step(state, batch, setup=setup, accum_steps=accum_steps,
                           teacher=(teacher.graphdef, teacher_params))

  jitted = jax.jit(fn_with_teacher, in_shardings=(
      setup.state_shardings, None, teacher.shardings),
                   out_shardings=out_shardings, donate_argnums=(0,))
  return Bound(jitted, (teacher.params,))


def jit_eval_step(setup: Setup, task, eval_inputs=None,
                  frozen=None) -> Bound:
  """(params, batch) -> the task's eval outputs, replicated to every host.

  `eval_inputs` (what `task.prepare_eval()` returned: the GAN's feature
  classifier) is passed as an argument (replicated) rather than baked into
  the compiled step as constants; so is a LoRA run's `frozen` base.
  """
  if frozen is not None:
    def fn_with_base(params, batch, eval_inputs, frozen):
      return task.eval_step(lora.merge_model(setup.graphdef, params, frozen),
                            batch, eval_inputs)

    jitted = jax.jit(fn_with_base, in_shardings=(
        setup.param_shardings, None, setup.replicated(),
        setup.frozen_shardings), out_shardings=setup.replicated())
    return Bound(jitted, (eval_inputs, frozen))

  def fn(params, batch, eval_inputs):
    return task.eval_step(nnx.merge(setup.graphdef, params), batch,
                          eval_inputs)

  jitted = jax.jit(fn, in_shardings=(setup.param_shardings, None,
                                     setup.replicated()),
                   out_shardings=setup.replicated())
  return Bound(jitted, (eval_inputs,))


def compile_train_step(setup: Setup, task, accum_steps: int = 1):
  """The train step compiled for abstract inputs (the state and the task's
  batch spec, with their shardings); a jax Compiled object, for inspecting
  what a strategy costs without data."""
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                   sharding=setup.batch_sharding(v.ndim))
           for k, v in task.batch_spec().items()}
  return jit_train_step(setup, task, accum_steps,
                        frozen=setup.frozen_abstract).lower(
      setup.abstract_state, batch).compile()
