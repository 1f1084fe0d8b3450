"""Poisson-sampled padded batches (lm/data/poisson.py): what the privacy
accountant assumes, checked with scipy: each example joins each step
independently with probability q; the padding is masked; the processes'
shares make the one-process sample; a restored iterator draws on."""
import numpy as np
from scipy import stats

from lm.data import poisson

N, RATE, STEPS = 60, 0.2, 1500


def _source():
  return [{"x": np.full(2, i, np.float32), "label": np.int32(i)}
          for i in range(N)]


def test_each_example_joins_each_step_with_probability_q():
  rows = poisson.padded_rows(N, RATE, STEPS, unit=4)
  assert rows % 4 == 0
  assert stats.binom.sf(rows, N, RATE) * STEPS <= poisson.OVERFLOW
  it = poisson.train_iterator(_source(), rate=RATE, rows=rows, seed=0)
  counts, sizes = np.zeros(N), []
  for _ in range(STEPS):
    b = next(it)
    real = b["mask"] > 0
    # Real rows first, then padding.
    np.testing.assert_array_equal(real, np.arange(rows) < real.sum())
    labels = b["label"][real]
    assert len(set(labels)) == len(labels)  # No example twice in a step.
    np.testing.assert_array_equal(b["x"][real][:, 0], labels)
    counts[labels] += 1
    sizes.append(real.sum())
  alpha = 1e-4 / N  # Of a false alarm, per example.
  lo, hi = stats.binom.ppf([alpha / 2, 1 - alpha / 2], STEPS, RATE)
  assert np.all((lo <= counts) & (counts <= hi))
  # The batch sizes are Binomial(N, q): a chi-square goodness of fit.
  k = np.arange(N + 1)
  expected = stats.binom.pmf(k, N, RATE) * STEPS
  observed = np.bincount(sizes, minlength=N + 1)
  keep = expected >= 5  # Pool the tails, as the test needs.
  obs = np.r_[observed[keep], observed[~keep].sum()]
  exp = np.r_[expected[keep], expected[~keep].sum()]
  assert stats.chisquare(obs, exp).pvalue > 1e-4


def test_shares_make_the_one_process_sample_and_restore_draws_on():
  one = poisson.train_iterator(_source(), rate=RATE, rows=32, seed=7)
  shares = [poisson.train_iterator(_source(), rate=RATE, rows=16, seed=7,
                                   share_index=i, share_count=2)
            for i in range(2)]
  for _ in range(5):
    whole = next(one)
    parts = [next(s) for s in shares]
    mine = sorted(np.concatenate([p["label"][p["mask"] > 0] for p in parts]))
    np.testing.assert_array_equal(mine, whole["label"][whole["mask"] > 0])
  state = one.get_state()
  after = [next(one)["label"] for _ in range(3)]
  again = poisson.train_iterator(_source(), rate=RATE, rows=32, seed=7)
  again.set_state(state)
  for want in after:
    np.testing.assert_array_equal(next(again)["label"], want)
