r"""Exports a run as portable artifacts that run without this code.

python scripts/export.py --workdir=runs/tiny --out=exports/tiny_hlo \
    --format=stablehlo
python scripts/export.py --workdir=runs/tiny --out=exports/tiny_tf \
    --format=savedmodel

Both formats hold the same functions: an LM's prefill and one KV-cache
decode step with symbolic batch and prompt length, a classifier's logits
with a symbolic batch. Float and int8 serving runs, imported and LoRA runs
(merged) alike.
stablehlo: jax.export programs and the weights beside them; the loader that
runs them, with jax and numpy only, is lm/interop/export.py's LOADER.
savedmodel: a TensorFlow SavedModel (jax2tf; the weights as variables) with
signatures prefill, decode (serving_default = prefill) or logits
(serving_default = logits), what TF Serving loads. Needs TensorFlow
(requirements-test.txt).
"""
from absl import flags, logging

from lm.run import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_OUT = flags.DEFINE_string("out", None, "Folder to write (new or empty).")
_FORMAT = flags.DEFINE_string("format", "stablehlo", "Artifact format: "
                              "stablehlo or savedmodel.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Write into a "
                                  "non-empty --out.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm.checks import UsageError  # noqa: PLC0415
  from lm.interop import export, savedmodel  # noqa: PLC0415
  writers = {"stablehlo": export.export_stablehlo,
             "savedmodel": savedmodel.export_savedmodel}
  if _FORMAT.value not in writers:
    raise UsageError(f"--format={_FORMAT.value!r} is unknown; use one of "
                     f"{list(writers)}.")
  about = writers[_FORMAT.value](_WORKDIR.value, _OUT.value,
                                 overwrite=_OVERWRITE.value)
  print(f"step {about['step']} of {_WORKDIR.value} -> {_OUT.value}: "
        + ", ".join(about["functions"]))


if __name__ == "__main__":
  cli.run(main)
