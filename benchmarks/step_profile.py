r"""Where our train step's time goes on this CPU: GEMMs against the rest,
from a `jax.profiler` trace of the step docs/performance.md races against
PyTorch (benchmarks/peer_torch.py's Llama-shaped bench model, one device).

    python benchmarks/step_profile.py [--steps=3] [--dtypes=float32,bfloat16]

XLA:CPU runs a compiled step as a graph of kernels ("thunks") on its
threads, several at once where the graph allows. The trace has each kernel
as an event on the thread that ran it. A kernel named `ynn_fusion*` is a
dot XLA handed to YNNPACK, its GEMM library (attention's batched matmuls
included); every other kernel is XLA's own code (elementwise fusions,
reductions, layout copies, ...). Per traced step (the client's wait for
the step's completion):
- `GEMMs`: the wall time in which at least one GEMM kernel runs;
- `other kernels alone`: the wall time in which only XLA's own kernels
  run, none of them beside a GEMM: what faster GEMMs could not remove;
- `nothing`: no kernel runs (dispatch, and the gaps between kernels).
Those three add up to the step. The second table splits the other kernels'
thread time (summed over threads, so it can exceed their wall time) by the
kind of fusion XLA named them after, largest first.

The profiler's overhead makes a traced step somewhat slower than the
untraced steps of the same run, which are reported beside it.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common, peer_torch
from lm import cpu

NAME = "step_profile"
GEMM = re.compile(r"^ynn_fusion")
STEP = "ThunkExecutor::Execute (wait for completion)"
WARMUP, TIMED = 5, 5
TOP_KINDS = 6


def _union(spans: list[tuple[float, float]]) -> float:
  """The length of a union of [start, end) intervals."""
  total, end = 0.0, float("-inf")
  for s, e in sorted(spans):
    if s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def _kind(name: str) -> str:
  """A kernel's kind: its name without the instance number."""
  return re.sub(r"\.\d+$", "", name)


def breakdown(trace: dict) -> list[dict]:
  """Per traced step: its wall time and the parts described above (ms),
  and the other kernels' thread time by kind."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  spans = [e for e in events if e.get("ph") == "X"]
  steps = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans
                 if e["name"] == STEP)
  if not steps:
    raise RuntimeError(f"the trace has no {STEP!r} events: this jax's "
                       "profiler names a step's execution differently.")
  kernels = [e for e in spans
             if "XLAEigen" in threads.get((e["pid"], e["tid"]), "")
             and not e["name"].startswith(("ThunkExecutor", "Threadpool",
                                           "SlinkyThreadPool", "end: "))]
  out = []
  for start, end in steps:
    inside = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in kernels
              if start <= e["ts"] < end]
    gemm, kinds = [], collections.Counter()
    for s, e, n in inside:
      if GEMM.match(n):
        gemm.append((s, e))
      else:
        kinds[_kind(n)] += (e - s) / 1e3
    gemm_wall, any_wall = _union(gemm), _union([(s, e) for s, e, _ in inside])
    out.append({"step_ms": (end - start) / 1e3,
                "gemm_ms": gemm_wall / 1e3,
                "other_alone_ms": (any_wall - gemm_wall) / 1e3,
                "nothing_ms": (end - start - any_wall) / 1e3,
                "other_thread_ms": dict(kinds)})
  return out


def measure(dtype: str, steps: int) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import lm.parallel  # noqa: PLC0415
  import lm.tasks  # noqa: PLC0415
  import lm.train.state  # noqa: PLC0415
  import lm.train.step  # noqa: PLC0415
  from lm.data import pipeline  # noqa: PLC0415

  config = peer_torch._config(dtype, [])
  mesh = lm.parallel.make_mesh(config.mesh, jax.devices()[:1])
  seq, batch = pipeline.seq_len(config), config.train.batch_size
  with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as tmp:
    setup = lm.train.state.make_setup(config, mesh)
    state = setup.init_fn(jax.random.key(config.seed))
    tokens = np.random.default_rng(0).integers(
        1, setup.model_cfg.vocab_size, (batch, seq + 1), np.int32)
    b = {"tokens": jax.device_put(tokens, setup.batch_sharding())}
    step = lm.train.step.jit_train_step(setup, lm.tasks.get(config))
    compiled = step.lower(state, b).compile()
    untraced = []
    for i in range(WARMUP + TIMED):
      t = time.perf_counter()
      state, metrics = compiled(state, b)  # The state is donated.
      jax.block_until_ready((state, metrics))
      if i >= WARMUP:
        untraced.append((time.perf_counter() - t) * 1e3)
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = compiled(state, b)
        jax.block_until_ready((state, metrics))
    path, = Path(tmp).glob("plugins/profile/*/perfetto_trace.json.gz")
    with gzip.open(path) as f:
      traced = breakdown(json.load(f))
  if len(traced) != steps:
    raise RuntimeError(f"{dtype}: {len(traced)} steps in the trace, "
                       f"{steps} traced.")
  return {"untraced_step_ms": untraced, "traced": traced}


def main() -> None:
  cpu.use_huge_pages()  # As a script does: our steps run in this process.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=3,
                      help="Traced steps per dtype (after the timed ones).")
  parser.add_argument("--dtypes", default=",".join(peer_torch.DTYPES))
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  dtypes = common.parse_only(parser, args.dtypes, peer_torch.DTYPES)
  runs = {dtype: measure(dtype, args.steps) for dtype in dtypes}
  for dtype, run in runs.items():
    print(dtype, tables({"runs": {dtype: run}})["table"], sep="\n")
  print(f"wrote {common.write(NAME, {'runs': runs}, args.out)}",
        file=sys.stderr)


def _median(run: dict, key: str) -> float:
  return statistics.median(s[key] for s in run["traced"])


def tables(results: dict) -> dict[str, str]:
  rows, kind_rows = [], []
  for dtype in peer_torch.DTYPES:
    run = results["runs"].get(dtype)
    if run is None:
      continue
    step = _median(run, "step_ms")
    parts = [_median(run, k) for k in ("gemm_ms", "other_alone_ms",
                                       "nothing_ms")]
    rows.append([dtype, f"{statistics.median(run['untraced_step_ms']):.0f}",
                 f"{step:.0f}",
                 *(f"{p:.0f} ({100 * p / step:.0f}%)" for p in parts)])
    kinds = collections.defaultdict(list)
    for s in run["traced"]:
      for kind, ms in s["other_thread_ms"].items():
        kinds[kind].append(ms)
    ms = {kind: statistics.median(v) for kind, v in kinds.items()}
    top = sorted(ms, key=lambda k: -ms[k])
    for kind in top[:TOP_KINDS]:
      kind_rows.append([dtype, f"`{kind}`", f"{ms[kind]:.1f}"])
    if len(top) > TOP_KINDS:
      rest = sum(ms[k] for k in top[TOP_KINDS:])
      kind_rows.append([dtype, f"the other {len(top) - TOP_KINDS} kinds",
                        f"{rest:.1f}"])
  return {"table": common.markdown(
      ["compute dtype", "step, untraced (ms)", "step, traced (ms)", "GEMMs",
       "other kernels alone", "nothing"], rows, "lrrrrr"),
          "kinds": common.markdown(
      ["compute dtype", "kernel kind (XLA's fusion name)",
       "thread time per step (ms)"], kind_rows, "llr")}


if __name__ == "__main__":
  main()
