"""A run as portable artifacts that run without this code: `jax.export`
StableHLO programs with the weights beside them (here), or a TensorFlow
SavedModel (savedmodel.py). Both export the same functions, described once
by `prepare`.

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

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import models
from lm.models import transformer
from lm.checks import UsageError
from lm.run import restore

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


@dataclasses.dataclass(frozen=True)
class Function:
  """`fn(weights, *inputs)` -> the outputs `outputs` names (a tuple; the
  array itself where there is one, as LOADER's callers get it). Each input is
  (name, dtype, shape), the shape in jax.export's symbolic syntax ("b, l":
  names are symbolic dimensions, numbers fixed ones, "" a scalar);
  `constraints` bound the symbols (jax.export.SymbolicScope)."""
  fn: Callable
  inputs: tuple[tuple[str, str, str], ...]
  outputs: tuple[str, ...]
  constraints: tuple[str, ...]
  signature: str

  def input_specs(self) -> list[jax.ShapeDtypeStruct]:
    # One scope per function: its symbols are its own (decode has no L).
    scope = jax.export.SymbolicScope(self.constraints)
    return [jax.ShapeDtypeStruct(
        jax.export.symbolic_shape(shape, scope=scope), jnp.dtype(dtype))
        for _, dtype, shape in self.inputs]


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A run's weights and functions, ready to export inside `mesh`."""
  weights: list[np.ndarray]
  functions: dict[str, Function]
  about: dict
  mesh: jax.sharding.Mesh

  def weight_specs(self) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in self.weights]


def prepare(workdir, out, *, overwrite: bool, fmt: str) -> Prepared:
  """Refuses a bad `out` or run (before restoring anything heavy), then
  restores `workdir`'s latest parameters and describes its functions."""
  _check_out(Path(out).expanduser(), overwrite)
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

  about = {"format": fmt, "version": VERSION, "run": str(workdir),
           "step": loaded.step, "model": config.model.to_dict(),
           "task": config.task}
  if config.model.name == "transformer":
    functions = _lm_functions(model_of, loaded.setup.model_cfg)
    about["tokenizer"] = config.data.tokenizer
  else:
    functions = _classifier_functions(model_of, config)
  about["functions"] = {name: f.signature for name, f in functions.items()}
  return Prepared(weights=[np.asarray(w) for w in leaves],
                  functions=functions, about=about, mesh=loaded.setup.mesh)


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
  prepared = prepare(workdir, out, overwrite=overwrite, fmt="stablehlo")
  with jax.set_mesh(prepared.mesh):
    serialized = {
        name: jax.export.export(jax.jit(f.fn))(
            prepared.weight_specs(), *f.input_specs()).serialize()
        for name, f in prepared.functions.items()}
  out.mkdir(parents=True, exist_ok=True)  # Only once everything exported.
  for name, data in serialized.items():
    (out / f"{name}.jaxexport").write_bytes(data)
  np.savez(out / "weights.npz",
           **{f"w{i:04d}": w for i, w in enumerate(prepared.weights)})
  write_about(out, prepared.about)
  return prepared.about


def write_about(out: Path, about: dict) -> None:
  (out / "export.json").write_text(json.dumps(about, indent=1) + "\n")


def _lm_functions(model_of, cfg) -> dict[str, Function]:
  cache = (f"{cfg.n_layers}, b, {cfg.max_len}, {cfg.n_kv_heads}, "
           f"{cfg.k}")
  dtype = jnp.dtype(cfg.dtype).name

  # The exported k and v stay [layers]-stacked whatever cfg.scan_layers
  # (the model's own cache is per layer without it): one format for every
  # run, and nothing to gain from the per-layer one here, since a caller of
  # an exported function (jax.export's call, TF Serving) donates no buffer:
  # each call writes its k and v outputs anew anyway.
  def prefill(weights, tokens_BxL):
    model = model_of(weights)
    cache = model.init_cache(tokens_BxL.shape[0], cfg.max_len)
    logits_BxLxV, cache = model(tokens_BxL, cache=cache, cache_index=0)
    cache = transformer.stack_cache(cache)
    return logits_BxLxV, cache["k"], cache["v"]

  def decode(weights, token_Bx1, k, v, index):
    cache = transformer.unstack_cache(cfg, {"k": k, "v": v})
    logits_Bx1xV, cache = model_of(weights)(
        token_Bx1, cache=cache, cache_index=index)
    cache = transformer.stack_cache(cache)
    return logits_Bx1xV, cache["k"], cache["v"]

  return {
      # Any batch, any prompt length up to max_len.
      "prefill": Function(
          prefill, (("tokens", "int32", "b, l"),), ("logits", "k", "v"),
          (f"l <= {cfg.max_len}",),
          "(tokens int32 [B, L]) -> (logits float32 [B, L, V], "
          "k, v [layers, B, max_len, kv_heads, head_dim])"),
      # Any batch.
      "decode": Function(
          decode, (("token", "int32", "b, 1"), ("k", dtype, cache),
                   ("v", dtype, cache), ("index", "int32", "")),
          ("logits", "k", "v"), (),
          "(token int32 [B, 1], k, v, index int32 []) -> "
          "(logits float32 [B, 1, V], k, v)"),
  }


def _classifier_functions(model_of, config) -> dict[str, Function]:
  cfg = models.model_config(config)
  if config.model.name == "transformer_classifier":
    # Tokens: any batch, any passage length up to max_len.
    inputs = (("tokens", "int32", "b, l"),)
    constraints = (f"l <= {cfg.max_len}",)
    signature = "(tokens int32 [B, L]) -> (logits float32 [B, classes])"
  else:
    example = models.MODELS[config.model.name].example_input(cfg)
    dims = ", ".join(map(str, example.shape[1:]))
    inputs = (("images", example.dtype.name, f"b, {dims}"),)
    constraints = ()
    signature = (f"(images {example.dtype.name} [B, {dims}]) -> "
                 "(logits float32 [B, classes])")

  def logits(weights, inputs):
    return model_of(weights)(inputs)

  return {"logits": Function(logits, inputs, ("logits",), constraints,
                             signature)}
