"""Every test runs on 8 simulated CPU devices (set before jax is imported)."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir():
  """One prepared Shakespeare corpus for the whole session (and all xdist
  workers: preparation is locked, and reused once done)."""
  path = os.environ.get("LM_TEST_DATA_DIR") or os.path.join(
      REPO, ".test_data")
  from lm.data import pipeline  # noqa: PLC0415
  pipeline.prepare(ml_collections.ConfigDict(
      dict(corpus="shakespeare", text_dir="", data_dir=path)))
  return path


def tiny_config(data_dir: str = "", **overrides) -> ml_collections.ConfigDict:
  """A very small LM config that compiles and steps in a second or two."""
  from configs import lm  # noqa: PLC0415
  c = lm.get_config("tiny")
  c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128,
                 max_len=32)
  c.train.update(steps=3, batch_size=16, log_every=1, eval_every=0,
                 eval_batches=2, checkpoint_every=0)
  c.optimizer.update(warmup_steps=1, learning_rate=1e-2)
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  c.data.data_dir = data_dir
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


assert jax.device_count() == 8, "tests expect 8 simulated devices"
