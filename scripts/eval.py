r"""Evaluates the latest checkpoint of a run on a held-out split.

python scripts/eval.py --workdir=runs/tiny [--split=test --batches=16]
Prints loss, perplexity and bits per byte (as in metrics.jsonl eval lines).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_SPLIT = flags.DEFINE_enum("split", "test", ["validation", "test"], "Split.")
_BATCHES = flags.DEFINE_integer("batches", 0, "Batches to evaluate; 0 = "
                                "config.train.eval_batches.")
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes; default: "
                            "the training mesh if it fits, else FSDP.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # noqa: PLC0415

  from lm import restore  # noqa: PLC0415
  from lm.data import pipeline, tokenizer as tokenizer_lib  # noqa: PLC0415
  from lm.parallel import rules as rules_lib  # noqa: PLC0415
  from lm.train import loop, step as step_lib  # noqa: PLC0415

  loaded = restore.load(_WORKDIR.value, _MESH.value)
  config = loaded.config
  tok = tokenizer_lib.get(config.data.tokenizer)
  split = pipeline.load_tokens(pipeline.prepare(config.data), _SPLIT.value,
                               tok)
  batches = pipeline.eval_batches(
      split.tokens, length=pipeline.seq_len(config),
      batch_size=config.train.batch_size // jax.process_count(),
      max_batches=_BATCHES.value or config.train.eval_batches,
      process_index=jax.process_index(), process_count=jax.process_count())
  with jax.set_mesh(loaded.setup.mesh), rules_lib.use(loaded.setup.rules):
    metrics = loop.evaluate(step_lib.jit_eval_step(loaded.setup),
                            loaded.params, batches, loaded.setup,
                            split.bytes_per_token)
  print(f"step {loaded.step} {_SPLIT.value} ({len(batches)} batches): " +
        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
  app.run(main)
