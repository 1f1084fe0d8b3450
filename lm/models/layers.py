"""Building blocks shared by two or more models: dense, norm, rotary embedding.
(Attention cores live in lm/models/attention.py; the custom VJPs that tune
XLA:CPU, in lm/models/tuning.py.)

Every parameter is created with logical axis names (see `lm/parallel/rules.py`)
through `param_init`; nothing here knows about meshes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import checks
from lm.models import tuning


def param_init(initializer, *names: str | None):
  """Attaches logical axis names to an initializer.

  `eager_sharding=False`: the names are logical, not mesh axes, so flax must
  not try to shard the value with them when it is created; the trainer maps
  them to mesh axes through the rules table and shards the whole state at once.
  """
  return nnx.with_partitioning(initializer, names, eager_sharding=False)


def fan_in_normal(fan_in: int):
  return nnx.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


def _weight(kernel, dtype):
  """A kernel's value in the compute dtype. Written with `jnp.asarray`
  because qwix intercepts that call: in a converted int8 model (lm/quant) the
  kernel is int8 values plus scales, which `.astype` cannot cast."""
  return jnp.asarray(kernel, dtype)


# config.model.einsum_grad: how a projection's weight gradient is computed.
EINSUM_GRADS = ("small_left", "autodiff")


def _autodiff_einsum(equation, x, w, out_dtype=None):
  # qwix intercepts both calls under QAT and int8 serving (see _weight); the
  # einsum is the plain one, and the result is cast afterwards.
  y = jnp.einsum(equation, x, _weight(w, x.dtype))
  return y if out_dtype is None else y.astype(out_dtype)


def einsum_for(grad: str):
  """The einsum a projection uses under config.model.einsum_grad:
  f(equation, x, w, out_dtype=None), where w (the parameter's value, in any
  dtype) is cast to x's dtype inside."""
  return tuning.weight_einsum if grad == "small_left" else _autodiff_einsum


class Einsum(nnx.Module):
  """A weight of any shape contracted with the input by an einsum equation.

  Used for every projection so attention weights keep their head axes
  (D x H x K rather than D x HK) and can be named and sharded per axis.
  `grad`: "small_left" differentiates through `tuning.weight_einsum` (faster
  weight gradients, see there); "autodiff" is jnp.einsum's own gradient,
  which QAT needs (qwix intercepts jnp.einsum and defines its gradient).
  """

  def __init__(self, equation: str, shape: Sequence[int],
               names: Sequence[str | None], *, fan_in: int, dtype, param_dtype,
               rngs: nnx.Rngs, grad: str = "small_left", bias: int = 0,
               dot_dtype: str = ""):
    """`bias`: how many trailing axes of the kernel the output has (a bias
    of that shape is added, zero at init); 0 = no bias. `dot_dtype`: the
    matmul's operand dtype when not the compute dtype `dtype` (float32 GEMMs
    for a bfloat16 model on a CPU without BF16 instructions); the result is
    still in `dtype` unless `out_dtype` asks otherwise."""
    self.equation = equation
    self.dtype = dtype
    self.dot_dtype = dot_dtype or dtype
    self.grad = grad
    init = param_init(fan_in_normal(fan_in), *names)
    self.kernel = nnx.Param(init(rngs.params(), tuple(shape), param_dtype))
    self.bias = (nnx.Param(param_init(nnx.initializers.zeros,
                                      *names[-bias:])(
        None, tuple(shape[-bias:]), param_dtype)) if bias else None)

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
    """`out_dtype`: the result's dtype when it should not be rounded to the
    compute dtype (an activation or RoPE follows in float32)."""
    y = einsum_for(self.grad)(self.equation, x.astype(self.dot_dtype),
                              self.kernel[...], out_dtype or self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


class Dense(nnx.Module):
  """x @ W (+ b) over the last axis; `names` are the logical (in, out) axes."""

  def __init__(self, d_in: int, d_out: int, names: tuple[str | None, str | None],
               *, dtype, param_dtype, rngs: nnx.Rngs, use_bias: bool = True,
               initializer=None):
    self.dtype = dtype
    init = param_init(initializer or fan_in_normal(d_in), *names)
    self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), param_dtype))
    self.bias = (nnx.Param(param_init(nnx.initializers.zeros, names[1])(
        None, (d_out,), param_dtype)) if use_bias else None)

  def __call__(self, x_BxI: jax.Array) -> jax.Array:
    # An einsum, which qwix intercepts in training and in serving alike.
    y_BxO = jnp.einsum("...i,io->...o", x_BxI.astype(self.dtype),
                       _weight(self.kernel[...], self.dtype))
    if self.bias is not None:
      y_BxO = y_BxO + self.bias[...].astype(self.dtype)
    return y_BxO


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype, param_dtype,
               rngs: nnx.Rngs):
    del rngs  # Deterministic init.
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(param_init(nnx.initializers.ones, "norm")(
        None, (dim,), param_dtype))
    self.bias = nnx.Param(param_init(nnx.initializers.zeros, "norm")(
        None, (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(
        jnp.float32)
    return y.astype(self.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `key` is None (evaluation)."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.2),
}


class RMSNorm(nnx.Module):
  """RMSNorm with its statistics in float32 whatever the compute dtype."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    del rngs  # Deterministic init; the argument keeps constructors uniform.
    self.eps = eps
    self.dtype = dtype
    self.scale = nnx.Param(param_init(nnx.initializers.ones, "norm")(
        None, (dim,), param_dtype))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    y = x * inv_rms * self.scale[...].astype(jnp.float32)
    return y.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Stretches RoPE's long wavelengths for longer contexts. kind "none", or
  "llama3" (Llama 3.1's: wavelengths above original_max_len /
  low_freq_factor are divided by `factor`, those below original_max_len /
  high_freq_factor kept, the band between interpolated)."""
  kind: str = "none"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192


ROPE_SCALINGS = ("none", "llama3")


def check_rope_scaling(scaling: RopeScaling, where: str) -> None:
  checks.one_of(scaling.kind, ROPE_SCALINGS, f"{where}.kind")
  if scaling.kind == "llama3":
    checks.require(
        scaling.factor > 0 and scaling.original_max_len > 0
        and 0 < scaling.low_freq_factor < scaling.high_freq_factor,
        f"{where}: needs factor > 0, original_max_len > 0 and 0 < "
        f"low_freq_factor < high_freq_factor; got {scaling}.")


def rope_inv_freq(base: float, half: int,
                  scaling: RopeScaling = RopeScaling()) -> np.ndarray:
  """float64 [half] angular frequencies of RoPE's rotate-half pairs."""
  inv_freq_K2 = base ** (-np.arange(half, dtype=np.float64) / half)
  if scaling.kind == "llama3":
    wavelen_K2 = 2 * np.pi / inv_freq_K2
    s = scaling
    smooth_K2 = ((s.original_max_len / wavelen_K2 - s.low_freq_factor)
                 / (s.high_freq_factor - s.low_freq_factor))
    scaled_K2 = np.where(wavelen_K2 > s.original_max_len / s.low_freq_factor,
                         inv_freq_K2 / s.factor, inv_freq_K2)
    medium_K2 = ((wavelen_K2 >= s.original_max_len / s.high_freq_factor)
                 & (wavelen_K2 <= s.original_max_len / s.low_freq_factor))
    inv_freq_K2 = np.where(
        medium_K2, (1 - smooth_K2) * scaled_K2 / s.factor
        + smooth_K2 * scaled_K2, scaled_K2)
  return inv_freq_K2


@functools.lru_cache(maxsize=None)
def _rope_table(base: float, max_len: int, half: int,
                scaling: RopeScaling = RopeScaling()):
  """float32 (sin, cos), each max_len x half. Cached: every layer's q and k
  then share one pair of arrays, which the program holds once."""
  inv_freq_K2 = rope_inv_freq(base, half, scaling)
  angle_PxK2 = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq_K2
  tables = (np.sin(angle_PxK2).astype(np.float32),
            np.cos(angle_PxK2).astype(np.float32))
  for table in tables:
    table.flags.writeable = False  # Shared by every caller.
  return tables


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, base: float,
         max_len: int, scaling: RopeScaling = RopeScaling()) -> jax.Array:
  """Rotary position embedding (rotate-half form), computed in float32.

  sin and cos come from a [max_len, K/2] table built with numpy when the
  model is traced (a constant of the program). Computed from the positions
  inside the step instead, XLA fuses the sin and cos into every consumer
  and evaluates them per element of q and k, forward and backward: about
  5% of a step at the reference shapes on XLA:CPU. Positions must be below
  max_len (config.model.max_len); jnp.take fills NaN beyond it.
  """
  half = x_BxLxHxK.shape[-1] // 2
  sin_PxK2, cos_PxK2 = _rope_table(base, max_len, half, scaling)
  sin_BxLx1xK2 = jnp.take(sin_PxK2, positions_BxL, axis=0)[:, :, None, :]
  cos_BxLx1xK2 = jnp.take(cos_PxK2, positions_BxL, axis=0)[:, :, None, :]
  out = _rotate(x_BxLxHxK.astype(jnp.float32), sin_BxLx1xK2, cos_BxLx1xK2)
  return out.astype(x_BxLxHxK.dtype)


def _rotate_plain(x_BxLxHxK, sin_BxLx1xK2, cos_BxLx1xK2):
  half = x_BxLxHxK.shape[-1] // 2
  x1, x2 = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:]
  return jnp.concatenate([x1 * cos_BxLx1xK2 - x2 * sin_BxLx1xK2,
                          x2 * cos_BxLx1xK2 + x1 * sin_BxLx1xK2], axis=-1)


@jax.custom_vjp
def _rotate(x_BxLxHxK, sin_BxLx1xK2, cos_BxLx1xK2):
  """The rotate-half product, whose gradient is the rotation by minus the
  angle: the same concatenate as the forward. Autodiff's gradient of the
  halves and the concatenate is slices, pads and adds, which XLA:CPU fused
  with the layout change around it into kernels several times slower than
  the forward's (5-9% of the tiny model's step on the demo's mesh). Same
  math: each gradient element is the same two products, summed."""
  return _rotate_plain(x_BxLxHxK, sin_BxLx1xK2, cos_BxLx1xK2)


def _rotate_fwd(x_BxLxHxK, sin_BxLx1xK2, cos_BxLx1xK2):
  return (_rotate_plain(x_BxLxHxK, sin_BxLx1xK2, cos_BxLx1xK2),
          (sin_BxLx1xK2, cos_BxLx1xK2))


def _rotate_bwd(tables, g_BxLxHxK):
  sin_BxLx1xK2, cos_BxLx1xK2 = tables
  # The tables are constants of the program: no gradient (None = zero).
  return _rotate_plain(g_BxLxHxK, -sin_BxLx1xK2, cos_BxLx1xK2), None, None


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


def no_transformer_axes(mesh: dict[str, int]) -> None:
  """Sequence, stage and expert axes split what only Transformers have."""
  for axis in ("sequence", "stage", "expert"):
    checks.require(mesh[axis] == 1, f"config.mesh.{axis}={mesh[axis]}: "
                   "sequence, stage and expert parallelism are for the "
                   "Transformer families; set it to 1.")
