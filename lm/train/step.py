"""Pure step functions: (state, batch) -> (state, metrics).

They close over static things only (graphdef, optimizer, schedule); the
trainer jits them with explicit in/out shardings and donates the state.
A batch is {"tokens": int32 B x (L+1)}: inputs are tokens[:, :-1] and targets
tokens[:, 1:].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.parallel import constrain
from lm.train.state import Setup, TrainState


def lm_loss(params, graphdef, tokens_BxL1):
  """Mean next-token cross-entropy (float32) and the token count."""
  model = nnx.merge(graphdef, params)
  logits_BxLxV, _ = model(tokens_BxL1[:, :-1])
  targets_BxL = tokens_BxL1[:, 1:]
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV,
                                                           targets_BxL)
  return ce_BxL.mean(), ce_BxL.size


def _grads(params, graphdef, tokens_BxL1, accum_steps: int):
  grad_fn = jax.value_and_grad(lambda p, t: lm_loss(p, graphdef, t)[0])
  if accum_steps == 1:
    return grad_fn(params, tokens_BxL1)
  # Microbatch i takes rows i, i+A, i+2A, ...: every device keeps its own
  # rows, so splitting the batch moves no data between devices.
  B = tokens_BxL1.shape[0]
  micro_AxMxL1 = tokens_BxL1.reshape(B // accum_steps, accum_steps,
                                     -1).swapaxes(0, 1)

  def body(carry, tokens_MxL1):
    loss_sum, grad_sum = carry
    tokens_MxL1 = constrain(tokens_MxL1, "batch", "length")
    loss, grads = grad_fn(params, tokens_MxL1)
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                  micro_AxMxL1)
  # Equal-sized microbatches: the mean of means is the full-batch mean.
  return loss / accum_steps, jax.tree.map(lambda g: g / accum_steps, grads)


def train_step(state: TrainState, batch, *, setup: Setup, accum_steps: int = 1
               ) -> tuple[TrainState, dict]:
  loss, grads = _grads(state.params, setup.graphdef, batch["tokens"],
                       accum_steps)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "learning_rate": setup.schedule(state.step)}
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state)
  return new_state, metrics


def eval_step(params, batch, *, setup: Setup) -> dict:
  """Sums (not means) so the host can aggregate over any number of batches."""
  loss, count = lm_loss(params, setup.graphdef, batch["tokens"])
  return {"loss_sum": loss * count, "count": jnp.asarray(count, jnp.float32)}


def jit_train_step(setup: Setup, accum_steps: int = 1):
  fn = functools.partial(train_step, setup=setup, accum_steps=accum_steps)
  batch_shardings = {"tokens": setup.batch_sharding()}
  return jax.jit(fn, in_shardings=(setup.state_shardings, batch_shardings),
                 out_shardings=(setup.state_shardings, setup.replicated()),
                 donate_argnums=(0,))


def jit_eval_step(setup: Setup):
  fn = functools.partial(eval_step, setup=setup)
  return jax.jit(fn, in_shardings=(setup.param_shardings,
                                   {"tokens": setup.batch_sharding()}),
                 out_shardings=setup.replicated())
