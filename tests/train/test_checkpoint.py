"""Checkpoints of one process on simulated devices: saved without compiling
anything, restored equal (typed PRNG keys stay typed)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lm.train import checkpoint


def test_one_process_saves_replicated_shards_without_compiling(tmp_path):
  """Orbax's replica-parallel save compiles a slice program per replicated
  shard and device (56 for the tiny LM on 8 devices); one process writes
  every replica itself, so lm/train/checkpoint.py turns it off there."""
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  rng = np.random.default_rng(0)
  host = {"w": rng.standard_normal((64, 32), np.float32),
          "b": rng.standard_normal((32,), np.float32)}
  state = {"w": jax.device_put(host["w"], NamedSharding(mesh, P("fsdp"))),
           "b": jax.device_put(host["b"], NamedSharding(mesh, P())),
           "key": jax.random.key(7)}
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)
  compiled = []

  def listen(event, duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(duration)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    ckpt.save(1, state)
    ckpt.check_saved(wait=True)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiled == []
  restored = ckpt.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state))
  np.testing.assert_array_equal(restored["w"], host["w"])
  np.testing.assert_array_equal(restored["b"], host["b"])
  assert jnp.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                jax.random.key_data(state["key"]))
