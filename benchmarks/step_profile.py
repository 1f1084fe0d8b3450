r"""Where our train step's time goes on this CPU: GEMMs against the rest,
from a `jax.profiler` trace of the step docs/performance.md races against
PyTorch (benchmarks/peer_torch.py's Llama-shaped bench model, one device).

    python benchmarks/step_profile.py [--steps=3] [--dtypes=float32,bfloat16]

XLA:CPU runs a compiled step as a graph of kernels ("thunks") on its
threads, several at once where the graph allows. The trace has each kernel
as an event on the thread that ran it. A GEMM kernel is a dot XLA handed to
YNNPACK, its GEMM library (attention's batched matmuls included): a
`ynn_fusion*` kernel whose computation in the compiled HLO is a dot (XLA
also hands YNNPACK some reductions, under the same name). Every other
kernel is XLA's own code (elementwise fusions, reductions, layout copies,
...) or such a reduction. Per traced step (the client's wait for
the step's completion):
- `GEMMs`: the wall time in which at least one GEMM kernel runs;
- `other kernels alone`: the wall time in which only XLA's own kernels
  run, none of them beside a GEMM: what faster GEMMs could not remove;
- `nothing`: no kernel runs (dispatch, and the gaps between kernels).
Those three add up to the step. The second table splits the other kernels'
thread time (summed over threads, so it can exceed their wall time) by the
kind of fusion XLA named them after, largest first. The third groups the
GEMM kernels by their dot's shape, read from the compiled step's HLO
(batch x M x K x N, the operand dtype), with their time per step, the rate
they ran at (2 M K N per batch element over that time; YNNPACK splits a
GEMM over the free threads, so one that runs alone may use both cores) and
the share of that time another GEMM ran beside them.

The profiler's overhead makes a traced step somewhat slower than the
untraced steps of the same run, which are reported beside it.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common, peer_torch
from lm import cpu

NAME = "step_profile"
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


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def _size(dims: list[int], axes: list[int]) -> int:
  return math.prod(dims[i] for i in axes)


def gemm_shapes(hlo: str) -> dict[str, dict]:
  """{GEMM kernel name: its dot's shape} from a compiled module's HLO text
  (`compiled.as_text()`): the `ynn_fusion` instructions whose computation
  is a dot (the others are reductions). A shape is {"dtype", "batch", "m",
  "k", "n", "flops"}: M, K and N multiply the lhs's free, the contracted
  and the rhs's free dimensions, batch the batch dimensions; flops =
  2 batch M K N."""
  bodies = {m["name"]: m["body"] for m in re.finditer(
      r"^%(?P<name>[\w.]+) \(.*?\n(?P<body>.*?)\n\}", hlo, re.S | re.M)}
  out = {}
  for m in re.finditer(r"%(?P<kernel>ynn_fusion[\w.]*) = .*?"
                       r"calls=%(?P<body>[\w.]+)", hlo):
    body = bodies.get(m["body"], "")
    shapes = {v["name"]: (v["dtype"], _dims(v["dims"])) for v in re.finditer(
        r"%(?P<name>[\w.]+) = (?P<dtype>\w+)\[(?P<dims>[\d,]*)\]", body)}
    dot = re.search(r"dot\(%(?P<lhs>[\w.]+), %(?P<rhs>[\w.]+)\)(?P<attrs>.*)",
                    body)
    if dot is None:
      continue
    (dtype, lhs), (_, rhs) = shapes[dot["lhs"]], shapes[dot["rhs"]]
    attrs = {a: _dims(v) for a, v in re.findall(r"(\w+_dims)=\{([\d,]*)\}",
                                                 dot["attrs"])}
    lb, lc = attrs.get("lhs_batch_dims", []), attrs["lhs_contracting_dims"]
    rb, rc = attrs.get("rhs_batch_dims", []), attrs["rhs_contracting_dims"]
    shape = {"dtype": dtype, "batch": _size(lhs, lb), "k": _size(lhs, lc),
             "m": _size(lhs, [i for i in range(len(lhs)) if i not in lb + lc]),
             "n": _size(rhs, [i for i in range(len(rhs)) if i not in rb + rc])}
    shape["flops"] = 2 * shape["batch"] * shape["m"] * shape["k"] * shape["n"]
    out[m["kernel"]] = shape
  return out


def breakdown(trace: dict, gemms: set[str]) -> list[dict]:
  """Per traced step: its wall time and the parts described above (ms),
  the other kernels' thread time by kind, and per GEMM kernel (by name) its
  time and the part of it another GEMM ran beside it. `gemms`: the GEMM
  kernels' names (gemm_shapes' keys)."""
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
    gemm, kinds, by_gemm = [], collections.Counter(), collections.Counter()
    for s, e, n in inside:
      if n in gemms:
        gemm.append((s, e, n))
        by_gemm[n] += (e - s) / 1e3
      else:
        kinds[_kind(n)] += (e - s) / 1e3
    gemm_wall = _union([(s, e) for s, e, _ in gemm])
    any_wall = _union([(s, e) for s, e, _ in inside])
    # Per GEMM kernel, the part of its time another GEMM ran beside it.
    beside = collections.Counter()
    for s, e, n in gemm:
      beside[n] += _union([(max(s, s2), min(e, e2)) for s2, e2, n2 in gemm
                           if n2 != n and s2 < e and e2 > s]) / 1e3
    out.append({"step_ms": (end - start) / 1e3,
                "gemm_ms": gemm_wall / 1e3,
                "other_alone_ms": (any_wall - gemm_wall) / 1e3,
                "nothing_ms": (end - start - any_wall) / 1e3,
                "other_thread_ms": dict(kinds),
                "gemm_thread_ms": dict(by_gemm),
                "gemm_beside_ms": dict(beside)})
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
    shapes = gemm_shapes(compiled.as_text())
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
      traced = breakdown(json.load(f), set(shapes))
  if len(traced) != steps:
    raise RuntimeError(f"{dtype}: {len(traced)} steps in the trace, "
                       f"{steps} traced.")
  return {"untraced_step_ms": untraced, "traced": traced,
          "gemm_shapes": shapes}


def main() -> None:
  cpu.use_huge_pages()  # As a script does: our steps run in this process.
  # This CPU's steps, and no TPU probe: with libtpu installed (the test
  # dependencies) it would load libtpu's profiler, which slows the traced
  # steps (lm/cpu.libtpu_profiler_on_cpu).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
       "thread time per step (ms)"], kind_rows, "llr"),
          "gemms": common.markdown(
      ["compute dtype", "GEMM batch x M x K x N", "kernels per step",
       "time per step (ms)", "GFLOP/s while it runs",
       "beside another GEMM"],
      [row for dtype in peer_torch.DTYPES if dtype in results["runs"]
       for row in _gemm_rows(dtype, results["runs"][dtype])], "llrrrr")}


def _gemm_rows(dtype: str, run: dict) -> list[list[str]]:
  """The GEMMs of one run grouped by shape, the most thread time first (the
  TOP_KINDS largest, then the rest and all together)."""
  shapes = run.get("gemm_shapes")
  if not shapes:  # Measured before the GEMMs were recorded by shape.
    return []
  names = collections.defaultdict(list)
  for name, sh in shapes.items():
    names[f"{sh['batch']} x {sh['m']} x {sh['k']} x {sh['n']} "
          f"({sh['dtype']})"].append(name)
  def median_ms(key: str, ns: list[str]) -> float:
    return statistics.median(sum(step[key].get(n, 0.0) for n in ns)
                             for step in run["traced"])
  groups = {label: {
      "kernels": len(ns), "flops": sum(shapes[n]["flops"] for n in ns),
      "ms": median_ms("gemm_thread_ms", ns),
      "beside_ms": median_ms("gemm_beside_ms", ns)}
            for label, ns in names.items()}

  def row(label: str, gs: list[dict]) -> list[str]:
    ms, flops = sum(g["ms"] for g in gs), sum(g["flops"] for g in gs)
    beside = sum(g["beside_ms"] for g in gs)
    return [dtype, label, str(sum(g["kernels"] for g in gs)), f"{ms:.1f}",
            f"{flops / ms / 1e6:.0f}", f"{100 * beside / ms:.0f}%"]
  top = sorted(groups, key=lambda k: -groups[k]["ms"])
  rows = [row(key, [groups[key]]) for key in top[:TOP_KINDS]]
  if len(top) > TOP_KINDS:
    rows.append(row(f"the other {len(top) - TOP_KINDS} shapes",
                    [groups[k] for k in top[TOP_KINDS:]]))
  return rows + [row("all GEMMs", list(groups.values()))]


if __name__ == "__main__":
  main()
