r"""Evaluates the latest checkpoint of a run on a held-out split.

python scripts/eval.py --workdir=runs/tiny [--split=test --batches=16]
Prints the metrics of the run's eval lines: for an LM loss, perplexity and
bits per byte on --split (cut into windows as the run's
config.data.packing says); for SFT the response loss and perplexity on
config.data.sft.eval; for a classifier or a GAN the whole test split
(--split and --batches apply to LMs only).
"""
from absl import flags, logging

from lm.run import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_SPLIT = flags.DEFINE_enum("split", "test", ["validation", "test"], "Split.")
_BATCHES = flags.DEFINE_integer("batches", 0, "Batches to evaluate; 0 = "
                                "config.train.eval_batches.")
_MESH = flags.DEFINE_string("mesh", None, "'data,fsdp,tensor' sizes or named "
                            "axes ('data=2,sequence=4'); default: "
                            "the training mesh if it fits, else FSDP.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import types  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from lm import tasks  # noqa: PLC0415
  from lm.data import pipeline  # noqa: PLC0415
  from lm.parallel.mesh import batch_share  # noqa: PLC0415
  from lm.quant import serving  # noqa: PLC0415
  from lm.run import loop, restore  # noqa: PLC0415
  from lm.train import step as step_lib  # noqa: PLC0415

  loaded = restore.load(_WORKDIR.value, _MESH.value)
  config = loaded.config
  task = tasks.get(config)
  share = batch_share(loaded.setup.mesh)
  if task.name == "lm":
    data = types.SimpleNamespace(**pipeline.eval_data(
        config, _SPLIT.value, _BATCHES.value or config.train.eval_batches,
        *share))
    where = f"{_SPLIT.value} ({len(data.eval)} batches)"
  elif task.name == "sft":
    data = task.make_data(*share)
    where = f"config.data.sft.eval ({len(data.eval)} batches)"
  else:
    data = task.make_data(*share)
    where = "test"
  with jax.set_mesh(loaded.setup.mesh):
    eval_step = step_lib.jit_eval_step(loaded.setup, task,
                                       task.prepare_eval())
    metrics = loop.evaluate(task, eval_step, loaded.params, data,
                            loaded.setup)
  kind = ("int8 serving model" if "serving" in config
          else f"quant.mode={config.quant.mode}")
  print(f"step {loaded.step} {where}: " +
        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) +
        f" | params {serving.params_bytes(loaded.params):,} bytes ({kind})")

if __name__ == "__main__":
  cli.run(main)
