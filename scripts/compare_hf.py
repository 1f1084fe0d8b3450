r"""Compares a run with a Hugging Face model: logits, KL, greedy text.

python scripts/compare_hf.py --workdir=runs/smol --hf_dir=~/models/SmolLM2-135M \
    [--prompt="ROMEO." --max_new_tokens=200]

Runs both in float32 (ours on --mesh; transformers on PyTorch's CPU) on
--batch random token sequences of each --lengths, and prints per length
the largest |logit difference|, the mean KL(transformers || ours) per token,
and whether the greedy next tokens agree. With --prompt, both also decode
--max_new_tokens greedily (ours: generate.py's KV-cache decoding; theirs:
transformers' generate with the folder's tokenizer) and the two texts are
printed and compared. Exits 1 if the greedy tokens differ. Needs torch and
transformers (`pip install -r requirements-test.txt`).
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
_PROMPT = flags.DEFINE_string("prompt", None, "Also compare greedy text from "
                              "this prompt.")
_NEW = flags.DEFINE_integer("max_new_tokens", 100, "Greedy tokens (--prompt).")
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
  import numpy as np  # noqa: PLC0415

  from lm.interop import compare  # noqa: PLC0415
  lengths = [int(n) for n in _LENGTHS.value]
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      _HF_DIR.value, dtype=torch.float32).eval()

  def theirs(tokens):
    with torch.no_grad():
      return hf_model(torch.as_tensor(tokens)).logits.numpy()

  from lm.run import restore  # noqa: PLC0415
  loaded = restore.load(_WORKDIR.value, _MESH.value)
  for row in compare.compare(loaded, theirs, lengths, batch=_BATCH.value,
                             seed=_SEED.value):
    print(f"length {row['length']:5d}: max |logit diff| "
          f"{row['max_abs_diff']:.3g}, KL/token {row['kl_per_token']:.3g}, "
          f"greedy agreement {row['argmax_agreement']:.3f}")
  if _PROMPT.value is None:
    return
  from lm.data import tokenizer as tokenizer_lib  # noqa: PLC0415
  tok = tokenizer_lib.get(loaded.config.data.tokenizer)
  hf_tok = transformers.AutoTokenizer.from_pretrained(_HF_DIR.value)
  prompt = np.asarray(tok.encode(_PROMPT.value), np.int32)
  hf_prompt = hf_tok(_PROMPT.value, add_special_tokens=False)["input_ids"]
  if list(prompt) != list(hf_prompt):
    raise UsageError(f"the two tokenizers encode --prompt differently "
                     f"(ours {list(prompt)[:8]}..., transformers' "
                     f"{hf_prompt[:8]}...): not the same tokenizer.")
  ours = compare.greedy(loaded, prompt, _NEW.value)
  with torch.no_grad():
    theirs = hf_model.generate(
        torch.as_tensor(prompt[None]), do_sample=False,
        max_new_tokens=_NEW.value, min_new_tokens=_NEW.value,
        eos_token_id=None, pad_token_id=0).numpy()[0, len(prompt):]
  print(f"ours:         {_PROMPT.value + tok.decode(ours)!r}")
  print(f"transformers: "
        f"{_PROMPT.value + hf_tok.decode(theirs, skip_special_tokens=True)!r}")
  same = np.array_equal(ours, theirs)
  print(f"greedy tokens identical: {same} ({_NEW.value} tokens)")
  if not same:
    first = int(np.argmax(ours != theirs))
    raise SystemExit(f"error: the greedy tokens differ from token {first}.")


if __name__ == "__main__":
  cli.run(main)
