"""The server's decode step, compiled for a TPU slice (scripts/aot_compile.py,
lm/run/aot.py): one token for each of `slots` requests with a KV cache of
`cache_len` positions, as lm/serve/engine.py runs it, from abstract
parameters and cache."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import backend
from lm.parallel import rules as rules_lib
from lm.run import aot
from lm.serve import engine

# As scripts/serve.py: the slots' batch replicated, the parameters sharded
# as in training.
RULES = dataclasses.replace(rules_lib.Rules(), batch=None)


def program(slots: int, cache_len: int) -> aot.Program:
  """The decode step for aot.plan."""
  return aot.Program(lambda config, tgt: _compile(config, tgt, slots,
                                                  cache_len),
                     held=lambda setup: setup.abstract_state.params)


def _compile(config, tgt: aot.Target, slots: int, cache_len: int):
  setup = aot.setup_for(config, tgt)
  cfg, mesh = setup.model_cfg, setup.mesh
  # The cache in the model's own layout (Model.init_cache): one stacked
  # [layers, ...] dict for scanned layers, else a tuple of per-layer dicts.
  layers = (cfg.n_layers,) if cfg.scan_layers else ()
  shape = (*layers, slots, cache_len, cfg.n_kv_heads, cfg.k)
  with rules_lib.use(RULES):
    # The engine pins the cache to the decode step's own output sharding
    # (kv heads over `tensor`, as the activations); here it is given.
    spec = rules_lib.fit_spec(rules_lib.current()(
        *(None,) * len(layers), "batch", None, "act_kv_heads", None), shape,
        mesh)
  layer_sharding = NamedSharding(mesh, spec)
  layer = {k: jax.ShapeDtypeStruct(shape, cfg.dtype, sharding=layer_sharding)
           for k in ("k", "v")}
  cache = layer if cfg.scan_layers else (layer,) * cfg.n_layers
  cache_sharding = jax.tree.map(lambda x: x.sharding, cache)
  replicated = NamedSharding(mesh, P())
  per_slot = [jax.ShapeDtypeStruct((slots,), dtype, sharding=replicated)
              for dtype in (jnp.int32,) * 4 + (jnp.float32, jnp.int32,
                                                jnp.float32)]
  params = setup.abstract_state.params
  graphdef = engine.dropless(setup.graphdef, params)

  def pinned(params, cache, *rest):
    cache, *out = engine.decode_step(graphdef, params, cache, *rest)
    return (jax.lax.with_sharding_constraint(cache, cache_sharding), *out)

  with backend.target("tpu"), rules_lib.use(RULES), jax.set_mesh(mesh):
    compiled, seconds = aot.compiled_or_oom(
        lambda: jax.jit(pinned, donate_argnums=(1,)).lower(
            params, cache, *per_slot).compile())
  return setup, compiled, seconds
