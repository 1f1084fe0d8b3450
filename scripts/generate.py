r"""Samples text from the latest checkpoint of a run, with a KV cache.

python scripts/generate.py --workdir=runs/tiny --prompt="ROMEO." \
    --max_new_tokens=200 [--temperature=0.8 --top_k=40 --top_p=0.95]
--temperature=0 is greedy decoding.
"""
from absl import flags, logging

from lm.checks import UsageError
from lm.run import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_PROMPT = flags.DEFINE_string("prompt", "\n", "Prompt text.")
_N = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_T = flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass to keep (1 = all).")
_NUM = flags.DEFINE_integer("num_samples", 1, "Samples (one batch).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_MESH = flags.DEFINE_string("mesh", None, "'data,fsdp,tensor' sizes or named "
                            "axes ('data=2,sequence=4'); default: "
                            "the training mesh if it fits, else FSDP.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import dataclasses  # noqa: PLC0415
  import functools  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from lm import sample  # noqa: PLC0415
  from lm.data import tokenizer as tokenizer_lib  # noqa: PLC0415
  from lm.parallel import rules as rules_lib  # noqa: PLC0415
  from lm.quant import serving  # noqa: PLC0415
  from lm.run import restore  # noqa: PLC0415

  config = restore.load_config(_WORKDIR.value)
  if config.task != "lm":
    raise UsageError(
        f"{_WORKDIR.value} holds a config.task={config.task!r} run; "
        "generate.py samples language models only (scripts/eval.py "
        "evaluates any run).")
  tok = tokenizer_lib.get(config.data.tokenizer)
  prompt = tok.encode(_PROMPT.value).astype(np.int32)
  total = len(prompt) + _N.value
  if not prompt.size:
    raise UsageError("--prompt must not be empty.")
  if total > config.model.max_len:
    raise UsageError(
        f"--prompt ({len(prompt)} tokens) + --max_new_tokens ({_N.value}) = "
        f"{total} is over the model's positional limit config.model.max_len="
        f"{config.model.max_len}; shorten one of them.")
  prompts = np.tile(prompt[None], (_NUM.value, 1))
  # A handful of prompts cannot be split over data x fsdp: replicate the
  # batch, keep the parameters sharded as in training.
  with rules_lib.use(dataclasses.replace(rules_lib.Rules(), batch=None)):
    loaded = restore.load(_WORKDIR.value, _MESH.value)
    fn = jax.jit(functools.partial(
        sample.generate, loaded.setup.graphdef, max_new_tokens=_N.value,
        temperature=_T.value, top_k=_TOP_K.value, top_p=_TOP_P.value))
    with jax.set_mesh(loaded.setup.mesh):
      out = jax.device_get(fn(loaded.params, prompts,
                              jax.random.key(_SEED.value)))
  print(f"[step {loaded.step}, mesh {dict(loaded.setup.mesh.shape)}, params "
        f"{serving.params_bytes(loaded.params):,} bytes"
        f"{' (int8 serving model)' if 'serving' in config else ''}]")
  for row in out:
    # Decoded with the prompt: a continuation alone can lose its leading
    # space (SentencePiece) or start inside a character (byte-level BPE).
    print(tok.decode(np.concatenate([prompt, row])))
    print("-" * 40)


if __name__ == "__main__":
  cli.run(main)
