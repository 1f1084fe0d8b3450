"""A run as portable artifacts: `jax.export` StableHLO programs with the
weights beside them, which a few lines of plain JAX run without this code.

An export directory (`export_stablehlo`) holds

  weights.npz        the parameters, flattened in order: w0000, w0001, ...
  <fn>.jaxexport     each function, serialized by jax.export; it takes the
                     weights as a list first
  export.json        what each function takes and returns, the model's
                     shapes, the tokenizer (a language model), the format
                     version

The language model exports `prefill(weights, tokens_BxL)` -> (logits
B x L x V, k and v caches [layers] x B x S x N x K, S = max_len) and
`decode(weights, token_Bx1, k, v, index)` -> (logits B x 1 x V, k, v): one
step of greedy or sampled decoding with the KV cache, as lm/sample.py does
it. Batch and prompt length are symbolic (any B, any 1 <= L <= max_len).
A classifier exports `logits(weights, inputs)` with a symbolic batch.

`LOADER` is the whole loader (it imports only jax and numpy);
tests/interop/test_export.py runs it in a process that cannot import lm.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import models
from lm.checks import UsageError
from lm.run import restore

FORMATS = ("stablehlo",)
FAMILIES = ("transformer", "transformer_classifier", "mlp")
VERSION = 1
LOADER = '''
import json, sys
import jax, numpy as np

def load(folder):
  """{name: f(*args)} of an lm export directory; jax and numpy only."""
  about = json.load(open(f"{folder}/export.json"))
  with np.load(f"{folder}/weights.npz") as npz:
    weights = [npz[f"w{i:04d}"] for i in range(len(npz.files))]
  fns = {}
  for name in about["functions"]:
    with open(f"{folder}/{name}.jaxexport", "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    fns[name] = (lambda e: lambda *args: e.call(weights, *args))(exported)
  return fns
'''


def _check_out(out: Path, overwrite: bool) -> None:
  if out.exists() and not out.is_dir():
    raise UsageError(f"--out={out} is a file; give a directory.")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise UsageError(f"--out={out} already holds files; choose a new "
                     "directory or pass --overwrite.")


def export_stablehlo(workdir, out, *, overwrite: bool = False) -> dict:
  """Writes `workdir`'s latest parameters and its functions into `out`;
  returns export.json's contents."""
  out = Path(out).expanduser()
  _check_out(out, overwrite)
  family = restore.load_config(workdir).model.name
  if family not in FAMILIES:
    raise UsageError(f"--workdir={workdir} holds a {family} run; "
                     f"{', '.join(FAMILIES)} runs export.")
  loaded = restore.load(workdir, "1,1,1")
  config = loaded.config
  leaves, treedef = jax.tree.flatten(jax.device_get(loaded.params))
  graphdef = loaded.setup.graphdef

  def model_of(weights):
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, list(weights)))

  weight_specs = [jax.ShapeDtypeStruct(np.shape(w), np.asarray(w).dtype)
                  for w in leaves]
  about = {"version": VERSION, "run": str(workdir), "step": loaded.step,
           "model": config.model.to_dict(), "task": config.task}
  with jax.set_mesh(loaded.setup.mesh):
    if config.model.name == "transformer":
      functions = _lm_functions(model_of, loaded.setup.model_cfg,
                                weight_specs)
      about["tokenizer"] = config.data.tokenizer
    else:
      functions = _classifier_functions(model_of, config, weight_specs)
  about["functions"] = {name: sig for name, (_, sig) in functions.items()}
  serialized = {name: exported.serialize()
                for name, (exported, _) in functions.items()}
  out.mkdir(parents=True, exist_ok=True)  # Only once everything exported.
  for name, data in serialized.items():
    (out / f"{name}.jaxexport").write_bytes(data)
  np.savez(out / "weights.npz",
           **{f"w{i:04d}": np.asarray(w) for i, w in enumerate(leaves)})
  (out / "export.json").write_text(json.dumps(about, indent=1) + "\n")
  return about


def _lm_functions(model_of, cfg, weight_specs) -> dict:
  # Prefill: any batch, any prompt length up to max_len; decode: any
  # batch (its own symbolic scope: the prompt length is not among its
  # arguments).
  b, l = jax.export.symbolic_shape("b, l", constraints=(
      f"l <= {cfg.max_len}",))
  (b1,) = jax.export.symbolic_shape("b")
  cache = jax.ShapeDtypeStruct(
      (cfg.n_layers, b1, cfg.max_len, cfg.n_kv_heads, cfg.k),
      jnp.dtype(cfg.dtype))

  def prefill(weights, tokens_BxL):
    model = model_of(weights)
    cache = model.init_cache(tokens_BxL.shape[0], cfg.max_len)
    logits_BxLxV, cache = model(tokens_BxL, cache=cache, cache_index=0)
    return logits_BxLxV, cache["k"], cache["v"]

  def decode(weights, token_Bx1, k, v, index):
    logits_Bx1xV, cache = model_of(weights)(
        token_Bx1, cache={"k": k, "v": v}, cache_index=index)
    return logits_Bx1xV, cache["k"], cache["v"]

  exported = {
      "prefill": jax.export.export(jax.jit(prefill))(
          weight_specs, jax.ShapeDtypeStruct((b, l), jnp.int32)),
      "decode": jax.export.export(jax.jit(decode))(
          weight_specs, jax.ShapeDtypeStruct((b1, 1), jnp.int32), cache,
          cache, jax.ShapeDtypeStruct((), jnp.int32)),
  }
  signatures = {
      "prefill": "(tokens int32 [B, L]) -> (logits float32 [B, L, V], "
                 "k, v [layers, B, max_len, kv_heads, head_dim])",
      "decode": "(token int32 [B, 1], k, v, index int32 []) -> "
                "(logits float32 [B, 1, V], k, v)"}
  return {name: (exported[name], signatures[name]) for name in exported}


def _classifier_functions(model_of, config, weight_specs) -> dict:
  cfg = models.model_config(config)
  if config.model.name == "transformer_classifier":
    # Tokens: any batch, any passage length up to max_len.
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(
        "b, l", constraints=(f"l <= {cfg.max_len}",)), jnp.int32)
    signature = "(tokens int32 [B, L]) -> (logits float32 [B, classes])"
  else:
    example = models.MODELS[config.model.name].example_input(cfg)
    b = jax.export.symbolic_shape("b")[0]
    spec = jax.ShapeDtypeStruct((b, *example.shape[1:]), example.dtype)
    signature = (f"(images {example.dtype.name} [B, "
                 f"{', '.join(map(str, example.shape[1:]))}]) -> "
                 "(logits float32 [B, classes])")

  def logits(weights, inputs):
    return model_of(weights)(inputs)

  return {"logits": (jax.export.export(jax.jit(logits))(weight_specs, spec),
                     signature)}
