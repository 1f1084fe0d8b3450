"""The server's decode step planned for a TPU slice (lm/serve/plan.py): it
compiles for the slice, and what it holds per chip is the parameters and
the KV cache, as their shapes and shardings say. Needs libtpu."""
import math

import jax
import pytest

from conftest import tiny_config
from lm.run import aot
from lm.serve import plan as serve_plan

pytest.importorskip("libtpu", reason="the TPU compiler (requirements-test)")


def _bytes_per_chip(x) -> int:
  return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def test_the_decode_step_holds_the_parameters_and_the_cache():
  tgt = aot.target("v5e:2x2")
  # Widths of 128 on every chip: the TPU's tiles add no padding.
  config = tiny_config(mesh=dict(data=1, fsdp=2, tensor=2))
  config.model.update(d_model=512, n_heads=4, n_kv_heads=2, d_ff=1024,
                      max_len=128)
  slots, length = 8, 128
  plan = aot.plan(config, tgt, serve_plan.program(slots, length),
                  estimate=False)
  assert plan.fits and plan.mfu is None
  config, _ = aot.validate(config, tgt)
  setup = aot.setup_for(config, tgt)
  params = sum(_bytes_per_chip(x)
               for x in jax.tree.leaves(setup.abstract_state.params))
  assert plan.state_bytes == params
  cfg = setup.model_cfg
  # K and V of every layer, slot and position; kv heads split over tensor.
  cache = (2 * cfg.n_layers * slots * length * cfg.n_kv_heads * cfg.k * 4
           // 2)
  assert plan.memory["arguments"] == pytest.approx(params + cache, rel=0.05)
  # The cache is donated: the program writes it in place.
  assert plan.memory["aliased"] >= cache
