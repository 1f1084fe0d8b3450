"""The explicit shard_map gradient reduction equals XLA's own."""
import numpy as np
import pytest

from conftest import assert_same_run, tiny_config, train_family as train
from lm.run import checks


def _batches(steps=3):
  rng = np.random.default_rng(0)
  return [{"tokens": rng.integers(0, 256, (16, 33)).astype(np.int32)}
          for _ in range(steps)]


@pytest.mark.parametrize("mesh_shape,accum,mode", [
    (dict(data=8, fsdp=1, tensor=1), 1, "psum"),
    (dict(data=4, fsdp=1, tensor=1), 2, "psum"),
    (dict(data=8, fsdp=1, tensor=1), 1, "reduce_scatter"),
], ids=str)
def test_explicit_reduction_equals_automatic_reduction(mesh_shape, accum,
                                                       mode):
  runs = {}
  for mode in ("auto", mode):
    config = tiny_config(**{"train.grad_reduce": mode,
                            "train.grad_accum_steps": accum})
    history, state, _ = train(config, mesh_shape, batches=_batches())
    runs[mode] = history, state
  (ref_h, ref_s), (h, s) = runs["auto"], runs[mode]
  assert_same_run(h, s, ref_h, ref_s)


@pytest.mark.parametrize("overrides,message", [
    ({"train.grad_reduce": "ring"}, r"config\.train\.grad_reduce='ring'"),
    ({"train.grad_reduce": "psum", "train.grad_reduce_dtype": "bfloat16"},
     r"grad_reduce_dtype='bfloat16': XLA:CPU cannot compile"),
    ({"train.grad_reduce_dtype": "int8"},
     r"config\.train\.grad_reduce_dtype='int8'"),
    ({"train.grad_reduce": "psum", "mesh": dict(data=4, fsdp=2, tensor=1)},
     r"grad_reduce=.psum. needs config\.mesh\.fsdp=1"),
])
def test_bad_reduction_config(overrides, message):
  config = tiny_config(**{"mesh": dict(data=-1, fsdp=1, tensor=1)})
  for key, value in overrides.items():  # After the mesh: it may override.
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(checks.ConfigError, match=message):
    checks.validate(config)
