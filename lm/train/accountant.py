"""How much privacy DP-SGD spends: Google's dp-accounting on the run's
sampling, host-side (plain floats; nothing here runs on a device).

One step is the sampled Gaussian mechanism: each example joins the batch
with probability q = batch_size / examples (Poisson sampling, what
lm/data/poisson.py draws), and the clipped sum gets N(0, (sigma C)^2)
noise; T steps compose it T times:

    SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)

accounted under add-or-remove-one neighbouring datasets by the RDP
accountant (Mironov et al.; the default of Opacus and TF-Privacy) or the
PLD accountant (tighter, slower). config.privacy.sampling=shuffle is
accounted with the same event, as Opacus and TF-Privacy do for shuffled
fixed batches: that event is not what shuffling does, and the true epsilon
of shuffled batches can be larger (Chua et al. 2024); docs/privacy.md.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import typing

from lm import checks

if typing.TYPE_CHECKING:
  import dp_accounting


def _dp():
  """dp-accounting, imported when privacy is on: it pulls in scipy.signal
  (1-3 s), which every other run would pay at start-up."""
  import dp_accounting  # noqa: PLC0415
  import dp_accounting.pld  # noqa: PLC0415, F401
  import dp_accounting.rdp  # noqa: PLC0415, F401
  return dp_accounting


class _KnownOrderWarnings(logging.Filter):
  """dp-accounting's RDP drops a fractional order (1.1, 1.2 at small
  noise) whose series does not converge, and warns at every call: hundreds
  of lines in a calibration. The bound is the minimum over the other orders
  either way, so the warning says nothing a run can act on."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "_compute_log_a_frac failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_KnownOrderWarnings())


def event(noise_multiplier: float, sampling_rate: float, steps: int
          ) -> dp_accounting.DpEvent:
  """`steps` Poisson-subsampled Gaussian mechanisms."""
  dp_accounting = _dp()
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
      steps)


def _accountant(name: str) -> dp_accounting.PrivacyAccountant:
  if name == "rdp":
    return _dp().rdp.RdpAccountant()
  if name == "pld":
    return _dp().pld.PLDAccountant()
  raise ValueError(f"config.privacy.accountant={name!r} is unknown; use rdp "
                   "or pld.")


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int,
            delta: float, accountant: str = "rdp") -> float:
  """Epsilon at `delta` after `steps` steps (0 before any)."""
  if steps <= 0:
    return 0.0
  acc = _accountant(accountant)
  acc.compose(event(noise_multiplier, sampling_rate, steps))
  return float(acc.get_epsilon(delta))


def calibrate(target_epsilon: float, sampling_rate: float, steps: int,
              delta: float, accountant: str = "rdp") -> float:
  """The smallest noise multiplier (to 1e-4 relative) whose `steps` steps
  spend at most `target_epsilon` at `delta`."""
  dp_accounting = _dp()
  sigma = dp_accounting.calibrate_dp_mechanism(
      lambda: _accountant(accountant),
      lambda s: event(s, sampling_rate, steps), target_epsilon, delta,
      dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-5)
  # Brent's method lands within tol on either side: step up until the
  # target holds, so the run never spends more than it was asked to.
  while epsilon(sigma, sampling_rate, steps, delta,
                accountant) > target_epsilon:
    sigma *= 1.0001
  return float(sigma)


def max_steps(noise_multiplier: float, sampling_rate: float, delta: float,
              target_epsilon: float, limit: int,
              accountant: str = "rdp") -> int:
  """The most steps (<= limit) whose epsilon stays <= target_epsilon
  (epsilon grows with the steps: bisection)."""
  def fits(t):
    return epsilon(noise_multiplier, sampling_rate, t, delta,
                   accountant) <= target_epsilon
  if fits(limit):
    return limit
  lo, hi = 0, limit  # fits(lo), not fits(hi).
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


@dataclasses.dataclass(frozen=True)
class Plan:
  """A run's privacy: its noise, its sampling rate and how far it may go."""
  noise_multiplier: float
  sampling_rate: float
  delta: float
  accountant: str
  steps: int  # The last step the budget allows (<= config.train.steps).
  calibrated: bool  # The noise multiplier was computed from target_epsilon.

  def epsilon(self, step: int) -> float:
    return epsilon(self.noise_multiplier, self.sampling_rate, step,
                   self.delta, self.accountant)

  def describe(self, config) -> str:
    c = config.privacy
    how = (f" (calibrated for epsilon {c.target_epsilon:g} in "
           f"{self.steps} steps)" if self.calibrated else "")
    return (f"DP-SGD: noise multiplier {self.noise_multiplier:.4f}{how}"
            f" | clip norm {c.clip_norm:g} | sampling rate "
            f"{self.sampling_rate:.5f} ({c.sampling}) | {c.accountant} "
            f"accountant: epsilon {self.epsilon(self.steps):.3f} at delta "
            f"{self.delta:g} after {self.steps} steps")


def plan(config, num_examples: int) -> Plan:
  """The Plan of a resolved config with privacy on, training on
  `num_examples` examples; ConfigError when the budget cannot be met."""
  c, train = config.privacy, config.train
  key = "config.privacy."
  q = train.batch_size / num_examples
  checks.require(q <= 1, f"config.train.batch_size={train.batch_size} is "
                 f"more than the {num_examples} training examples; with "
                 "privacy it is the expected batch (sampling rate batch_size"
                 " / examples), so lower it.")
  # A delta well below 1 / examples: the next power of ten under a tenth.
  suggest = 10.0 ** (math.floor(math.log10(1 / num_examples)) - 1)
  checks.require(c.delta < 1 / num_examples,
                 f"{key}delta={c.delta:g} is not below 1 / {num_examples} "
                 "training examples: a mechanism that publishes one random "
                 f"example satisfies it. Use e.g. {key}delta={suggest:g}.")
  if c.noise_multiplier == 0:  # Spend target_epsilon in exactly the run.
    sigma = calibrate(c.target_epsilon, q, train.steps, c.delta, c.accountant)
    return Plan(sigma, q, c.delta, c.accountant, train.steps, True)
  steps = train.steps
  if c.target_epsilon:
    steps = max_steps(c.noise_multiplier, q, c.delta, c.target_epsilon,
                      train.steps, c.accountant)
    first = epsilon(c.noise_multiplier, q, 1, c.delta, c.accountant)
    checks.require(
        steps > 0, f"{key}noise_multiplier={c.noise_multiplier:g} cannot "
        f"reach {key}target_epsilon={c.target_epsilon:g}: one step already "
        f"spends epsilon {first:.3g} at delta {c.delta:g} (sampling rate "
        f"{q:.4g}). Raise the noise multiplier, or set it to 0 to have it "
        "calibrated for config.train.steps.")
  return Plan(float(c.noise_multiplier), q, c.delta, c.accountant, steps,
              False)


def describe_stop(plan_: Plan, config) -> str:
  """The message of a run stopped by its budget."""
  nxt = plan_.epsilon(plan_.steps + 1)
  return (f"privacy budget spent: step {plan_.steps + 1} would take epsilon "
          f"to {nxt:.3f} > config.privacy.target_epsilon="
          f"{config.privacy.target_epsilon:g} at delta {plan_.delta:g}; "
          f"stopped at step {plan_.steps} of config.train.steps="
          f"{config.train.steps} (checkpoint saved). Raise the noise "
          "multiplier or the budget to train further.")

