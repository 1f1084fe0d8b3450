"""Poisson-sampled training batches of a fixed shape, for DP-SGD.

Step t's batch: every example of the training split joins independently
with probability q (config.train.batch_size / examples), drawn from
numpy's generator seeded with (seed, t): the sampling the privacy
accountant (lm/train/accountant.py) assumes. The jitted step needs one
shape, so the sample is padded to `rows` with copies of example 0 whose
"mask" is 0 (the private gradient multiplies each example's clipped
gradient by its mask).

`rows` is chosen so that a sample larger than it occurs with probability
below OVERFLOW over the whole run (the binomial tail, scipy). Such a
sample would be cut to a random subset of `rows`; that changes the
guarantee by at most (1 + e^epsilon) * OVERFLOW on delta (docs/privacy.md).

Every process draws the same global sample and keeps its share's examples
(index % share_count == share_index, as the shuffled pipelines split the
split): the examples of a step do not depend on the number of processes.
Batch t is a pure function of t, so the grain iterator's state is one
integer and a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

import math
from typing import Callable

import grain
import numpy as np

from lm.data.sources import DataError

OVERFLOW = 1e-12  # Probability that any step of a run overflows `rows`.


def padded_rows(num_examples: int, rate: float, steps: int, unit: int,
                share_count: int = 1) -> int:
  """Global rows of a padded batch: a multiple of `unit` (the batch's
  shards x accumulation steps) whose share per process holds a sample of
  that process's examples except with probability OVERFLOW over `steps`."""
  if unit % share_count:
    raise DataError(f"{share_count} processes cannot share batches of a "
                    f"multiple of {unit} rows evenly; use a mesh whose batch "
                    "shards are a multiple of the processes.")
  mine = math.ceil(num_examples / share_count)
  per_step = OVERFLOW / (steps * share_count)
  from scipy import stats  # noqa: PLC0415 - 0.4 s: not at import.
  need = int(stats.binom.isf(per_step, mine, rate))
  while need < mine and stats.binom.sf(need, mine, rate) > per_step:
    need += 1
  need = max(min(need, mine), 1)
  return math.ceil(need * share_count / unit) * unit


class PoissonBatches:
  """Step -> this process's padded Poisson sample, {..., "mask"}."""

  def __init__(self, source, *, rate: float, rows: int, seed: int,
               share_index: int = 0, share_count: int = 1,
               transform: Callable | None = None):
    """`source`: random access to {name: array} examples; `rows`: this
    process's padded rows; `transform(example, rng)`: e.g. augmentation,
    with a generator seeded by (seed, step, example index)."""
    self.source = source
    self.rate = rate
    self.rows = rows
    self.seed = seed
    self.share = (share_index, share_count)
    self.transform = transform

  def __call__(self, step: int) -> dict:
    step = int(step)
    rng = np.random.default_rng((self.seed, step))
    chosen = np.flatnonzero(rng.random(len(self.source)) < self.rate)
    index, count = self.share
    mine = chosen[chosen % count == index]
    if len(mine) > self.rows:  # Probability < OVERFLOW in a run: see above.
      mine = np.sort(rng.choice(mine, self.rows, replace=False))
    examples = [self.source[int(i)] for i in mine]
    if self.transform is not None:
      examples = [self.transform(ex, np.random.default_rng((self.seed, step,
                                                            int(i))))
                  for ex, i in zip(examples, mine)]
    pad = self.source[0]
    examples += [pad] * (self.rows - len(examples))
    batch = {k: np.stack([np.asarray(ex[k]) for ex in examples])
             for k in pad}
    batch["mask"] = (np.arange(self.rows) < len(mine)).astype(np.float32)
    return batch


def train_iterator(source, *, rate: float, rows: int, seed: int,
                   share_index: int = 0, share_count: int = 1,
                   transform: Callable | None = None):
  """Endless Poisson-sampled batches (a checkpointable grain iterator)."""
  if not 0 < rate <= 1:
    raise DataError(f"The sampling rate {rate:g} (config.train.batch_size / "
                    f"{len(source)} examples) must be in (0, 1]: lower "
                    "config.train.batch_size.")
  batches = PoissonBatches(source, rate=rate, rows=rows, seed=seed,
                           share_index=share_index, share_count=share_count,
                           transform=transform)
  ds = grain.MapDataset.range(1 << 62).map(batches)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                   prefetch_buffer_size=2)))
