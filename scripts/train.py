r"""Trains a model; rerunning the same command resumes from the checkpoint.

python scripts/train.py --config=configs/lm.py:tiny --workdir=runs/tiny \
    [--config.mesh.fsdp=2 --config.train.steps=100 ...]

Multi-process (every host runs the same command; see WORKSPACE.md):
    ... --coordinator_address=HOST0:1234 --num_processes=N --process_id=I
(or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; SLURM,
Open MPI and Cloud TPU are detected without flags). On one machine,
scripts/launch_local.py starts the N processes for you.
"""
from absl import flags, logging
from ml_collections import config_flags

from lm.run import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_STOP_AT = flags.DEFINE_integer(
    "stop_at_step", None, "Checkpoint and exit after this step, as a "
    "preemption would; rerun without it to continue.")
_JOIN_JOB = cli.distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO.
  _JOIN_JOB()  # Before anything starts a backend.
  import jax  # noqa: PLC0415

  from lm.run import loop  # noqa: PLC0415
  result = loop.train(_CONFIG.value, _WORKDIR.value,
                      stop_at_step=_STOP_AT.value)
  if "eval" in result and jax.process_index() == 0:
    print("final eval: " + ", ".join(
        f"{k} {v:.4f}" for k, v in result["eval"].items()))


if __name__ == "__main__":
  cli.run(main)
