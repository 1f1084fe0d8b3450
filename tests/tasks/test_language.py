"""The language-modeling eval: its loss is the mean next-token cross-entropy
over the eval batches, and perplexity and bits per byte follow their
formulas from it and from the raw validation text."""
import json
import math

import jax
import numpy as np
from flax import nnx

from conftest import tiny_config
from lm.data import pipeline
from lm.run import loop, restore


def test_eval_line_follows_the_formulas(tmp_path, data_dir):
  config = tiny_config(data_dir, mesh=dict(data=2, fsdp=2, tensor=2),
                       **{"train.steps": 2, "train.eval_every": 2})
  loop.train(config, tmp_path)
  with open(tmp_path / "metrics.jsonl") as f:
    (line,) = [x for x in map(json.loads, f) if x["split"] == "eval"]

  # The loss: mean cross-entropy of every next token of the eval batches,
  # computed here in float64 from the restored model's logits.
  loaded = restore.load(tmp_path, "1,1,1")
  builder = pipeline.prepare(loaded.config.data)
  documents = [ex["text"] for ex in builder.as_data_source(split="validation")]
  tokens = np.concatenate([np.append(np.frombuffer(d, np.uint8), 0)
                           for d in documents if d]).astype(np.int32)
  length, batch = pipeline.seq_len(config), config.train.batch_size
  # Windows of length + 1 tokens, each starting where the previous one's
  # inputs end (its last token is the next window's first input).
  windows = np.stack([tokens[i * length:(i + 1) * length + 1]
                      for i in range(config.train.eval_batches * batch)])
  with jax.set_mesh(loaded.setup.mesh):
    model = nnx.merge(loaded.setup.graphdef, loaded.params)
    logits = np.asarray(model(windows[:, :-1])[0], np.float64)
  log_probs = logits - np.log(np.exp(
      logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  ce = -np.take_along_axis(log_probs, windows[:, 1:, None], -1).mean()
  np.testing.assert_allclose(line["loss"], ce, rtol=1e-5)

  # Perplexity and bits per byte, from the loss and the split's own text
  # (every document's UTF-8 bytes, plus one end-of-document token each).
  assert math.isclose(line["perplexity"], math.exp(line["loss"]),
                      rel_tol=1e-9)
  num_bytes = sum(len(d) for d in documents if d)
  bits = line["loss"] / math.log(2) * len(tokens) / num_bytes
  assert math.isclose(line["bits_per_byte"], bits, rel_tol=1e-9)
