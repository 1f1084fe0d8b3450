r"""Converts the latest checkpoint of a run into a real int8 serving model.

python scripts/quantize.py --workdir=runs/int8 --out=runs/int8_serving
python scripts/eval.py --workdir=runs/int8_serving      # loss, bytes
python scripts/generate.py --workdir=runs/int8_serving  # samples

From a QAT run (config.quant.mode != none) this stores the weights QAT
trained for; from a float run it is post-training quantization (PTQ), the
baseline QAT should beat. The layers converted are config.quant.layers;
everything else stays float32. --activations=auto keeps the source run's
activation quantization (int8 for a float run).
"""
from absl import flags, logging

from lm.checks import UsageError
from lm.run import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to convert.")
_OUT = flags.DEFINE_string("out", None, "Where to write the serving model.")
_ACTS = flags.DEFINE_enum("activations", "auto", ["auto", "int8", "float"],
                          "Activation quantization of the serving model.")
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes; default: "
                            "the training mesh if it fits, else FSDP.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)

  import jax  # noqa: PLC0415

  from lm import paths  # noqa: PLC0415
  from lm.quant import serving  # noqa: PLC0415
  from lm.run import loop, restore  # noqa: PLC0415
  from lm.train import checkpoint as ckpt_lib  # noqa: PLC0415

  out = paths.resolve(_OUT.value)
  if restore.is_serving_dir(_WORKDIR.value):
    raise UsageError(f"--workdir={_WORKDIR.value} is already a serving "
                         "model; pass the training run it came from.")
  if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
    raise UsageError(f"--out={out} already holds a model; choose a new "
                         "directory (nothing was overwritten).")
  if not restore.load_config(_WORKDIR.value).quant.layers:
    raise UsageError(
        f"{_WORKDIR.value}/config.json names no layers to quantize "
        "(config.quant.layers is empty): the LM and classifier presets name "
        "theirs; a GAN is not quantized.")
  loaded = restore.load(_WORKDIR.value, _MESH.value)
  config = serving.serving_config(loaded.config, _ACTS.value)
  with jax.set_mesh(loaded.setup.mesh):
    params = serving.convert(loaded.params, config)
  out.mkdir(parents=True, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(out / "checkpoints", async_save=False)
  ckpt.save(loaded.step, serving.checkpoint_item(params, loaded.step),
            force=True)
  ckpt.close()
  with config.unlocked():
    config.serving.source_workdir = str(paths.resolve(_WORKDIR.value))
  loop.write_config(config, out)
  before = serving.params_bytes(loaded.params)
  after = serving.params_bytes(params)
  print(f"step {loaded.step}: {before:,} bytes (float32) -> {after:,} bytes "
        f"({before / after:.2f}x smaller; {serving.dtype_bytes(params)}); "
        f"source quant.mode={config.serving.source_mode}, activations "
        f"{config.serving.activations}. Wrote {out}.")


if __name__ == "__main__":
  cli.run(main)
