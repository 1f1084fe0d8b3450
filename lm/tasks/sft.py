"""Supervised fine-tuning: the LM's loss on the response tokens only.

Records from JSON Lines (lm/data/sft.py) are rendered with a template,
packed into windows with segment ids (attention stays inside a record,
positions restart) and weighted 1 on the response tokens, 0 on the prompt
and padding; the train and eval losses are the weighted means. Evaluation
reports the response-only loss and perplexity.

Usually started from another run's parameters (config.train.init_from: a
trained or imported model); configs/sft.py has the presets.
"""
from __future__ import annotations

import math

from lm.data import sft as sft_data
from lm.tasks import language
from lm.tasks.language import LanguageModeling
from lm.tasks.supervised import Supervised


class FineTuning(LanguageModeling):
  name = "sft"
  EVAL_METRICS = ("loss", "perplexity")

  def check(self, model_cfg, mesh: dict[str, int]) -> None:
    del mesh
    sft_data.check(self.config, model_cfg)
    language.check_packing(self.config, model_cfg)

  def make_data(self, share_index: int = 0, share_count: int = 1):
    return sft_data.make(self.config, share_index, share_count)

  # Not the LM's windows: lm/run/checks.py refuses DP-SGD for SFT (records
  # are packed several to a window) before this could be asked.
  _privacy_source = Supervised._privacy_source

  @staticmethod
  def summarize(outputs: list[dict], data, *, workdir=None,
                step: int = 0) -> dict[str, float]:
    del data, workdir, step
    loss = (sum(float(o["loss_sum"]) for o in outputs)
            / sum(float(o["count"]) for o in outputs))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
