"""benchmarks/step_profile.py's accounting: which kernels of a compiled
program are GEMMs, and their shapes, read from the HLO XLA:CPU compiled."""
import jax
import jax.numpy as jnp

from benchmarks import step_profile


def _compiled_text(fn, *shapes_and_dtypes) -> str:
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in
          shapes_and_dtypes]
  return jax.jit(fn).lower(*args).compile().as_text()


def test_gemm_shapes_are_the_dots_of_the_program():
  def fn(a_MxK, b_KxN, c_BxMxK, d_BxKxN, e_TxN):
    return (a_MxK @ b_KxN,
            jnp.einsum("bmk,bkn->bmn", c_BxMxK, d_BxKxN,
                       preferred_element_type=jnp.float32),
            # A reduction, which XLA:CPU may also hand to YNNPACK: no GEMM.
            jnp.max(e_TxN, axis=0))
  text = _compiled_text(fn, ((640, 32), jnp.float32), ((32, 48), jnp.float32),
                        ((4, 64, 32), jnp.bfloat16),
                        ((4, 32, 16), jnp.bfloat16),
                        ((640, 48), jnp.float32))
  shapes = sorted(step_profile.gemm_shapes(text).values(),
                  key=lambda s: s["batch"])
  assert shapes == [
      {"dtype": "f32", "batch": 1, "m": 640, "k": 32, "n": 48,
       "flops": 2 * 640 * 32 * 48},
      {"dtype": "bf16", "batch": 4, "m": 64, "k": 32, "n": 16,
       "flops": 2 * 4 * 64 * 32 * 16}], text


def test_only_named_gemms_count_as_gemm_time():
  """A trace of one 10 ms step on two threads: GEMMs A (0-4 ms) and B
  (2-5 ms) side by side, then a YNNPACK reduction (5-6 ms) and a loop
  fusion (6-9 ms); only A's and B's intervals count as GEMM time."""
  thread = {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7,
            "args": {"name": "XLAEigen/7"}}
  def span(name, ts, dur, tid=7):
    return {"ph": "X", "name": name, "pid": 1, "tid": tid, "ts": ts,
            "dur": dur}
  trace = {"traceEvents": [
      thread, {**thread, "tid": 8, "args": {"name": "XLAEigen/8"}},
      span(step_profile.STEP, 0, 10_000, tid=1),
      span("ynn_fusion.3", 0, 4_000), span("ynn_fusion.5", 2_000, 3_000, 8),
      span("ynn_fusion.4", 5_000, 1_000, tid=8),
      span("add_fusion.1", 6_000, 3_000)]}
  step, = step_profile.breakdown(trace, {"ynn_fusion.3", "ynn_fusion.5"})
  assert step["gemm_ms"] == 5.0
  assert step["other_alone_ms"] == 4.0
  assert step["nothing_ms"] == 1.0
  assert step["gemm_thread_ms"] == {"ynn_fusion.3": 4.0, "ynn_fusion.5": 3.0}
  assert step["gemm_beside_ms"] == {"ynn_fusion.3": 2.0, "ynn_fusion.5": 2.0}
  assert step["other_thread_ms"] == {"ynn_fusion": 1.0, "add_fusion": 3.0}
