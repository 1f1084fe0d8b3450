"""Quantization-aware training with qwix: `config.quant` -> a quantized model.

The one place quantization touches a model: `apply` wraps the model built by
its family with qwix's interception, so each matched layer's einsum runs on
quantized operands in the forward pass (integer dot products for int8/int4,
float8 for fp8) with straight-through gradients, while the parameters stay
float32. Model files never branch on it.

config.quant:
  mode        none | int8 | int4_weights | fp8 | int4
                int8          int8 weights (per-output-channel scales) and
                              int8 activations (per-token dynamic scales).
                int4_weights  int4 weights; activations per `activations`.
                fp8           float8_e4m3 weights and activations.
                int4          int4 x int4: TPU/GPU only (XLA:CPU cannot
                              compile it; refused there before compiling).
  layers      regexes, each fully matching module paths such as
              "transformer/blocks/0/mlp/up" or "hidden/1". Unlisted layers
              (by default the embedding and the output head) stay float.
  activations int8 | float: the activations of int4_weights.
  backward    none | int8 | fp8: also quantize the incoming gradients of the
              backward pass's matmuls (fp8 backward uses e5m2).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from lm import checks

# mode -> (weight dtype, activation dtype); None = float.
MODES = {
    "none": (None, None),
    "int8": (jnp.int8, jnp.int8),
    "int4_weights": (jnp.int4, jnp.int8),
    "fp8": (jnp.float8_e4m3fn, jnp.float8_e4m3fn),
    "int4": (jnp.int4, jnp.int4),
}
ACTIVATIONS = {"int8": jnp.int8, "float": None}
BACKWARD = {"none": None, "int8": jnp.int8, "fp8": jnp.float8_e5m2}


class QuantError(checks.ConfigError):
  """A config.quant problem; the message names the key and the fix."""


def dtypes(quant_cfg) -> tuple:
  """(weight dtype, activation dtype) of `quant_cfg`'s mode."""
  weights, acts = MODES[quant_cfg.mode]
  if quant_cfg.mode == "int4_weights":
    acts = ACTIVATIONS[quant_cfg.activations]
  return weights, acts


# qwix scales integer values so a row's largest magnitude lands on +-127.5,
# exactly between two levels; XLA computes x / scale as x * (1 / scale) in
# some partitionings and not others, so that tie breaks differently (-128 or
# -127) on different meshes. A range 0.1% wider puts every row's largest value
# at +-127.37, off the tie, and quantized runs agree across meshes.
CALIBRATION = "absmax,1.001"


def calibration(dtype) -> str:
  if dtype is not None and jnp.issubdtype(dtype, jnp.integer):
    return CALIBRATION
  return "absmax"


def rules(quant_cfg) -> list[qwix.QtRule]:
  """One qwix rule per `layers` pattern, all with the mode's dtypes."""
  weights, acts = dtypes(quant_cfg)
  bwd = BACKWARD[quant_cfg.backward]
  return [qwix.QtRule(module_path=pattern, weight_qtype=weights,
                      act_qtype=acts, bwd_qtype=bwd,
                      weight_calibration_method=calibration(weights),
                      act_calibration_method=calibration(acts))
          for pattern in quant_cfg.layers]


def quantize(model: nnx.Module, quant_cfg, example_input) -> nnx.Module:
  """`model` for quantization-aware training under `quant_cfg`."""
  return quantize_with(qwix.QtProvider(rules(quant_cfg)), model,
                       example_input)


def quantize_with(provider, model: nnx.Module, example_input) -> nnx.Module:
  """`model` intercepted by a qwix provider (QAT or PTQ). Raises QuantError
  when a rule's pattern matches no layer with a matmul."""
  quantized = qwix.quantize_model(model, provider, example_input)
  unused = [r.module_path for r in provider.get_unused_rules()]
  if unused:
    paths = ["/".join(map(str, p)) for p, m in nnx.iter_modules(model)
             if "kernel" in vars(m)]
    raise QuantError(
        f"config.quant.layers: {unused[0]!r} matches no layer with a matmul; "
        f"patterns must fully match module paths such as {paths[:6]}.")
  return quantized


@functools.cache
def backend_compiles(weights, acts) -> bool:
  """Whether this backend compiles a matmul of the two quantized dtypes
  (XLA:CPU, for one, cannot run int4 x int4)."""
  if acts is None or weights is None:
    return True
  x = jnp.ones((4, 64), acts)
  w = jnp.ones((64, 16), weights)
  try:
    jax.jit(lambda a, b: jax.lax.dot_general(
        a, b, (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.int32 if jnp.issubdtype(
            a.dtype, jnp.integer) else jnp.float32)).lower(x, w).compile()
  except Exception:  # noqa: BLE001  (XLA reports this as various errors)
    return False
  return True


def check(quant) -> None:
  """Validates config.quant's names (pattern checks need the model: see
  `quantize`). Raises QuantError."""
  name = quant.mode
  if name not in MODES:
    raise QuantError(f"config.quant.mode={name!r} is unknown; use one of "
                     f"{list(MODES)}.")
  if name == "none":
    return
  for key, allowed in (("activations", ACTIVATIONS), ("backward", BACKWARD)):
    value = quant[key]
    if value not in allowed:
      raise QuantError(f"config.quant.{key}={value!r} is unknown; use one of "
                       f"{list(allowed)}.")
  if not quant.layers:
    raise QuantError("config.quant.layers is empty: list the module-path "
                     "patterns to quantize, e.g. ['.*blocks/.*mlp/up'].")
  weights, acts = dtypes(quant)
  if not backend_compiles(weights, acts):
    raise QuantError(
        f"config.quant.mode={name!r}: the {jax.default_backend()} backend "
        f"cannot compile {jnp.dtype(weights).name} x {jnp.dtype(acts).name} "
        "matmuls. Use mode='int4_weights' (int4 weights, int8 activations) "
        "here, and mode='int4' on TPU or GPU.")
