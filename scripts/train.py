r"""Trains a model; rerunning the same command resumes from the checkpoint.

python scripts/train.py --config=configs/lm.py:tiny --workdir=runs/tiny \
    [--config.mesh.fsdp=2 --config.train.steps=100 ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_STOP_AT = flags.DEFINE_integer(
    "stop_at_step", None, "Checkpoint and exit after this step, as a "
    "preemption would; rerun without it to continue.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO.
  import lm.train  # noqa: PLC0415  (after flags: jax reads XLA_FLAGS on import)
  result = lm.train.run(_CONFIG.value, _WORKDIR.value,
                        stop_at_step=_STOP_AT.value)
  if "eval" in result:
    print("final eval: " + ", ".join(
        f"{k} {v:.4f}" for k, v in result["eval"].items()))


if __name__ == "__main__":
  app.run(main)
