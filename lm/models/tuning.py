"""Backend tuning: custom VJPs that compute the same math as plain autodiff
but steer how XLA:CPU lays out and schedules it.

- `weight_einsum`: a projection whose weight gradient puts the smaller
  operand on the GEMM's left and returns the float32-accumulated gradient.
- `accumulate_einsum`: every matmul accumulates in float32, which XLA:CPU
  runs on its native BF16 GEMM for bfloat16 operands.
- `remat`: rematerialization whose recomputation waits for the backward
  pass (XLA:CPU otherwise runs it during the forward pass and saves nothing).

Each is tested equal to the plain path (tests/models/test_tuning.py); the
model files choose them through lm/models/layers.py and their configs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def weight_einsum(equation: str, x: jax.Array, w: jax.Array,
                  out_dtype=None) -> jax.Array:
  """jnp.einsum(equation, x, w) whose weight gradient XLA:CPU computes
  without transposing the larger operand.

  The weight gradient contracts the input with the output gradient over the
  token axes, which are the *major* axes of both. A GEMM takes its left
  operand with the contracted axis minor, so one of the two must be
  transposed. Under plain autodiff XLA folds the permutation of the result
  into the dot and so always transposes the operand that lines up with the
  weight's first axes: for the MLP's down projection that is the B x L x F
  hidden activation, which XLA:CPU then transposes inside the GELU backward
  fusion (45 ms per layer of an 800 ms step at the reference shapes). Here
  the smaller operand goes on the left, and an optimization barrier keeps
  XLA from undoing that: the permutation moves to the small weight-shaped
  result. Same math as autodiff; the sums run in another order.

  Dtypes: `w` may be wider than `x` (the float32 parameter under bfloat16
  compute); it is cast to x's dtype for the matmul, and its gradient comes
  back in w's dtype straight from the float32 accumulator, not rounded to
  bf16 and widened again (one convert kernel less per weight, and a more
  precise gradient). `out_dtype` (e.g. float32 before an activation or
  RoPE): the product is returned in that dtype from the accumulator. The
  incoming gradient is cast to x's dtype before the backward matmuls, so
  every matmul takes compute-dtype operands.
  """
  return accumulate_einsum(equation, x, w.astype(x.dtype), out_dtype)


def accumulate_einsum(equation: str, a: jax.Array, b: jax.Array,
                      out_dtype=None) -> jax.Array:
  """jnp.einsum with a float32 result, rounded to `out_dtype` (default: a's
  dtype) afterwards.

  For bfloat16 operands this is what makes the matmul fast on CPU: XLA:CPU
  hands a bf16 x bf16 -> f32 dot to its YNNPACK GEMM (native AVX512-BF16,
  about 2x the float32 rate here), but runs a bf16 x bf16 -> bf16 dot as
  convert -> float32 GEMM -> convert. On accelerators it is the usual
  float32 accumulation; for float32 operands it changes nothing.
  """
  y = jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)
  return y.astype(out_dtype or a.dtype)


def _weight_einsum_fwd(equation, x, w, out_dtype):
  return (accumulate_einsum(equation, x, w.astype(x.dtype), out_dtype),
          (x, w))


def _weight_einsum_bwd(equation, out_dtype, residuals, g):
  del out_dtype
  x, w = residuals  # w in its own dtype; XLA shares the forward's cast.
  g = g.astype(x.dtype)
  inputs, out = equation.split("->")
  a, b = inputs.split(",")
  dx = accumulate_einsum(f"{out},{b}->{a}", g, w.astype(x.dtype))
  if x.size <= g.size:
    dw = accumulate_einsum(f"{a},{out}->{b}", x, g, w.dtype)
  else:  # [batch axes] + the output's weight axes + the input's.
    order = "".join([c for c in b if c in a and c in out] +
                    [c for c in out if c in b and c not in a] +
                    [c for c in a if c in b and c not in out])
    dw = jax.lax.optimization_barrier(
        accumulate_einsum(f"{out},{a}->{order}", g, x, w.dtype))
    dw = jnp.einsum(f"{order}->{b}", dw)
  return dx, dw


weight_einsum.defvjp(_weight_einsum_fwd, _weight_einsum_bwd)


REMAT_POLICIES = {
    "none": None,  # No rematerialization: keep every activation.
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Like dots_no_batch, but the saved matmul outputs wait in host memory
    # (GPU/TPU: pinned host memory; CPU has no separate host memory).
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
}
REMAT_BACKENDS = {"offload": ("gpu", "tpu")}  # Policies not every backend has.


# Policies built by `remat` below; the rest go through nnx.remat.
TIED_REMAT = ("full", "dots", "dots_no_batch")


def remat(run_block, policy: str):
  """run_block(block, x, layer_cache, positions) -> (x, cache, aux), with the
  block's activations rematerialized under REMAT_POLICIES[policy].

  Why not plain nnx.remat (jax.checkpoint): XLA:CPU schedules the recomputed
  forward as soon as its inputs exist, i.e. during the original forward
  pass, and keeps its results live until the backward, so every activation
  was held as without remat (docs/performance.md, log entry 10). jax's
  optimization barriers do not prevent that: XLA:CPU removes them before it
  schedules. Here each block is a custom VJP whose backward adds
  `0 * (one element of the block's output gradient)` to what the forward
  kept. XLA does not fold a float multiply by zero (NaN semantics), so the
  recomputation depends on the gradient and waits for the backward pass to
  reach the block. Under "full" the forward keeps the block's inputs; under
  "dots" and "dots_no_batch" what jax.checkpoint's policy saves (jax.vjp's
  residuals: the inputs and the matmul outputs). A non-finite gradient
  element makes the recomputed block NaN; the step's gradients are non-finite
  then anyway. "offload", decoding (a KV cache, no backward) and blocks with
  state besides their parameters use nnx.remat.
  """
  if policy not in TIED_REMAT:
    return nnx.remat(run_block, policy=REMAT_POLICIES[policy])

  def wrapped(block, x_BxLxD, layer_cache, positions_BxL):
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    if layer_cache is not None or jax.tree.leaves(rest):
      return nnx.remat(run_block, policy=REMAT_POLICIES[policy])(
          block, x_BxLxD, layer_cache, positions_BxL)

    def forward(params, x_BxLxD, positions_BxL):
      return run_block(nnx.merge(graphdef, params, rest), x_BxLxD, None,
                       positions_BxL)

    checkpointed = jax.checkpoint(forward, policy=REMAT_POLICIES[policy])

    @jax.custom_vjp
    def rematted(params, x_BxLxD, positions_BxL):
      return forward(params, x_BxLxD, positions_BxL)

    def rematted_fwd(params, x_BxLxD, positions_BxL):
      if policy == "full":
        # The inputs themselves, not jax.vjp's residuals: inside nnx.scan
        # those held more (the `long` step at sequence=8 kept 753 MiB of
        # temporaries instead of 97; tests/models/test_model.py).
        return (forward(params, x_BxLxD, positions_BxL),
                (params, x_BxLxD, positions_BxL))
      return jax.vjp(checkpointed, params, x_BxLxD, positions_BxL)

    def rematted_bwd(kept, cotangent):
      dx_BxLxD = cotangent[0]
      zero = dx_BxLxD[(0,) * dx_BxLxD.ndim] * 0
      kept = jax.tree.map(
          lambda r: r + zero.astype(r.dtype)
          if jnp.issubdtype(r.dtype, jnp.floating) else r, kept)
      vjp_fn = jax.vjp(forward, *kept)[1] if policy == "full" else kept
      return vjp_fn(cotangent)

    rematted.defvjp(rematted_fwd, rematted_bwd)
    return rematted(params, x_BxLxD, positions_BxL)

  return wrapped
