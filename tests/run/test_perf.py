"""Performance accounting: FLOPs per step, peaks per device kind, MFU."""
import json
import types

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lm.models import transformer
from lm.run import perf


def _device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_analytic_flops_match_xla_cost_analysis(mlp):
  """The analytic count (matmuls, attention over the full score matrix)
  against XLA's count of the same training step with jax.nn's attention
  (which computes the full matrix): within 2%, the rest being elementwise
  work XLA also counts."""
  cfg = transformer.Config(vocab_size=256, max_len=128, d_model=128,
                           n_layers=2, n_heads=4, n_kv_heads=4, d_ff=512,
                           mlp=mlp, attention_impl="xla")
  graphdef, params = nnx.split(transformer.Model(cfg, nnx.Rngs(0)))
  tokens = jnp.zeros((4, 128), jnp.int32)

  def loss(p):
    return nnx.merge(graphdef, p)(tokens)[0].mean()
  lowered = jax.jit(jax.grad(loss)).lower(params)
  analytic = transformer.flops_per_token(cfg, 128) * tokens.size
  assert perf.xla_flops(lowered) == pytest.approx(analytic, rel=0.02)


def test_data_sheet_peaks_per_chip_and_override(monkeypatch):
  monkeypatch.delenv("LM_PEAK_TFLOPS", raising=False)
  h100 = [_device("gpu", "NVIDIA H100 80GB HBM3")] * 8
  peak, source = perf.peak_flops("bfloat16", h100)
  assert peak == 8 * 989e12 and "H100" in source
  v5e = [_device("tpu", "TPU v5 lite")] * 4
  assert perf.peak_flops("bfloat16", v5e)[0] == 4 * 197e12
  assert perf.peak_flops("bfloat16", [_device("gpu", "Mystery")])[0] != \
      perf.peak_flops("bfloat16", [_device("gpu", "Mystery")])[0]  # NaN
  monkeypatch.setenv("LM_PEAK_TFLOPS", "2.5")
  assert perf.peak_flops("float32", h100)[0] == 8 * 2.5e12


def test_cpu_peak_is_measured_once_and_shared_by_simulated_devices(
    monkeypatch, tmp_path):
  monkeypatch.delenv("LM_PEAK_TFLOPS", raising=False)
  monkeypatch.setattr(perf, "CACHE", str(tmp_path / "peaks.json"))
  calls = []
  monkeypatch.setattr(perf, "measure_cpu_peak",
                      lambda dtype: calls.append(dtype) or 3e11)
  cpus = [_device("cpu", "cpu")] * 8
  assert perf.peak_flops("float32", cpus)[0] == 3e11  # Not 8x: shared cores.
  assert perf.peak_flops("float32", cpus[:1])[0] == 3e11
  assert calls == ["float32"]  # The second came from the cache file.
  assert list(json.loads((tmp_path / "peaks.json").read_text()).values()) \
      == [3e11]


def test_mfu_is_model_flops_over_time_over_peak():
  meter = perf.Meter(flops_per_step=2e9, peak=1e10)
  assert meter.metrics(steps=10, seconds=5.0) == pytest.approx(
      {"step_time_s": 0.5, "mfu": 0.4})
  assert "mfu" not in perf.Meter(2e9, float("nan")).metrics(1, 1.0)
