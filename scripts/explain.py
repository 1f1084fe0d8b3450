r"""Explains a trained run: attention maps and integrated-gradients
attributions (docs/interpretability.md).

python scripts/explain.py --workdir=runs/tiny --text="ROMEO. But soft"
python scripts/explain.py --workdir=runs/genres --text="..." --target_class=-1
python scripts/explain.py --workdir=runs/mlp_digits --num_images=8

LM and text classifier: one PNG of attention maps per layer (its heads in a
grid, tokens on the axes) and the text coloured by each token's integrated
gradients (PNG and HTML). MLP on images: each test image beside its pixel
attributions (PNG). Files go to --out (default WORKDIR/explain); the
printed summary holds the completeness gap (Captum's convergence delta).
"""
from absl import flags, logging

from lm.run import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_METHODS = flags.DEFINE_list(
    "methods", [], "attention, ig (integrated gradients); default: every "
    "method the run's model family has (the MLP: ig).")
_TEXT = flags.DEFINE_string(
    "text", "ROMEO.\nBut soft, what light through yonder window breaks?",
    "LM and text classifier: the text to explain.")
_POSITION = flags.DEFINE_integer(
    "position", -1, "LM: attribute the next token's log-prob at this "
    "position (-1: the last; after the text's end, the model's most likely "
    "next token, otherwise the text's own).")
_TARGET_CLASS = flags.DEFINE_integer(
    "target_class", -1, "Classifiers: the class whose logit is attributed; "
    "-1: the predicted class.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8,
                                   "MLP: the first test images to explain.")
_STEPS = flags.DEFINE_integer("steps", 50, "Integrated gradients: points on "
                              "the path from the baseline.")
_RULE = flags.DEFINE_enum("rule", "gauss_legendre",
                          ["gauss_legendre", "trapezoid"],
                          "Integrated gradients: the quadrature rule.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Integrated gradients: path "
                              "points per forward pass (0: all at once).")
_OUT = flags.DEFINE_string("out", None, "Output folder; default "
                           "WORKDIR/explain.")
_MESH = flags.DEFINE_string("mesh", None, "'data,fsdp,tensor' sizes or named "
                            "axes; default: the training mesh if it fits, "
                            "else FSDP.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm.explain import report  # noqa: PLC0415 (jax reads XLA_FLAGS late)

  request = report.Request(
      methods=tuple(_METHODS.value), text=_TEXT.value,
      position=_POSITION.value, target_class=_TARGET_CLASS.value,
      num_images=_NUM_IMAGES.value, steps=_STEPS.value, rule=_RULE.value,
      batch_size=_BATCH.value, mesh=_MESH.value, out=_OUT.value)
  for line in report.explain(_WORKDIR.value, request):
    print(line)


if __name__ == "__main__":
  cli.run(main)
