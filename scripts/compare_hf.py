r"""Compares a run with a Hugging Face model on random tokens: logits and KL.

python scripts/compare_hf.py --workdir=runs/smol --hf_dir=~/models/SmolLM2-135M

Runs both in float32 (ours on --mesh; transformers on PyTorch's CPU) on
--batch random token sequences of each --lengths, and prints per length
the largest |logit difference|, the mean KL(transformers || ours) per token,
and whether the greedy next tokens agree. Needs torch and transformers
(`pip install -r requirements-test.txt`).
"""
from absl import flags, logging

from lm.checks import UsageError
from lm.run import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model folder.")
_LENGTHS = flags.DEFINE_list("lengths", ["1", "17", "64"], "Sequence lengths.")
_BATCH = flags.DEFINE_integer("batch", 2, "Sequences per length.")
_SEED = flags.DEFINE_integer("seed", 0, "Token seed.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh for our model; default: the "
                            "run's if it fits, else FSDP.")
flags.mark_flags_as_required(["workdir", "hf_dir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
  except ImportError:
    raise UsageError("compare_hf.py needs torch and transformers: pip "
                     "install -r requirements-test.txt") from None
  from lm.interop import compare  # noqa: PLC0415
  lengths = [int(n) for n in _LENGTHS.value]
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      _HF_DIR.value, dtype=torch.float32).eval()

  def theirs(tokens):
    with torch.no_grad():
      return hf_model(torch.as_tensor(tokens)).logits.numpy()

  for row in compare.compare(_WORKDIR.value, theirs, lengths,
                             batch=_BATCH.value, seed=_SEED.value,
                             mesh=_MESH.value):
    print(f"length {row['length']:5d}: max |logit diff| "
          f"{row['max_abs_diff']:.3g}, KL/token {row['kl_per_token']:.3g}, "
          f"greedy agreement {row['argmax_agreement']:.3f}")


if __name__ == "__main__":
  cli.run(main)
