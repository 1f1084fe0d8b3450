r"""GPipe's measured pipeline bubble against theory, (S-1)/(M+S-1).

    python benchmarks/pipeline_bubble.py [--runs=20]

Two simulated CPU devices, stage=2, so each stage has one of the machine's
two cores. For each M at a fixed global batch B:
  T_pipe(M):  forward + backward of `gpipe` over all the stacked blocks;
  T_mb(M):    forward + backward of one stage's layers on one microbatch
              (B/M rows) on one device, no pipeline, measured in a child
              process confined to one core: XLA:CPU would otherwise spread one
              device's ops over both cores, which a pipeline stage cannot.
              (Re-pinning this process's threads around each call instead
              measured 33 ms rather than 9 ms for a one-row microbatch.)
  measured  = 1 - M * T_mb / T_pipe: the share of T_pipe that is not its
              stage's useful work (idle ticks, transfers, the output psum,
              the re-materialized forward, and whatever running in a
              2-device XLA:CPU program costs).
  T_mb,pp(M): the same microbatch's work measured inside the pipeline
              program: gpipe on B/M rows with M=1 (the two stages in turn),
              divided by S; measured,pp = 1 - M * T_mb,pp / T_pipe compares
              the schedule's overlap with its own per-tick cost.
Medians of `--runs` timed calls after compile; T_pipe and T_mb,pp are
interleaved so that load from other processes hits them alike. The JSON
holds the median seconds; the fractions are computed by `tables`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

from benchmarks import common

NAME = "pipeline_bubble"
STAGES = 2
MICROBATCHES = (1, 2, 4, 8, 16)
MODEL = dict(vocab_size=256, max_len=64, d_model=256, n_layers=4, n_heads=4,
             n_kv_heads=4, d_ff=1024, scan_layers=True)
BATCH, LENGTH = 16, 64


def _fwd_bwd(apply):
  """jit(grad of a sum-of-squares loss w.r.t. params and input)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  loss = lambda p, x, pos: jnp.mean(apply(p, x, pos) ** 2)  # noqa: E731
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _gpipe_fn(layer_fn, m: int):
  from lm.parallel import pipeline  # noqa: PLC0415
  # Outside a mesh, gpipe is the plain scan over the layers it is given.
  return _fwd_bwd(lambda p, x, pos: pipeline.gpipe(
      layer_fn, p, x, pos, microbatches=m))


def _time(fn, args, mesh=None) -> float:
  import jax  # noqa: PLC0415
  with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _setup():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from lm.models import transformer  # noqa: PLC0415
  model = transformer.Model(transformer.Config(**MODEL), nnx.Rngs(0))
  graphdef, state = nnx.split(model.transformer.blocks)
  layer_fn = lambda p, x, pos: nnx.merge(graphdef, p)(x, pos)[0]  # noqa: E731
  x_BxLxD = jax.random.normal(jax.random.key(1),
                              (BATCH, LENGTH, MODEL["d_model"]))
  pos_BxL = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32),
                             (BATCH, LENGTH))
  return layer_fn, nnx.to_pure_dict(state), x_BxLxD, pos_BxL


def reference_times(runs: int, microbatches: list[int]) -> dict[int, float]:
  """T_mb for each M: one stage's layers on one microbatch, one device."""
  import jax  # noqa: PLC0415
  layer_fn, params, x_BxLxD, pos_BxL = _setup()
  one_stage = jax.tree.map(lambda a: a[:MODEL["n_layers"] // STAGES], params)
  fn, times = _gpipe_fn(layer_fn, 1), {}
  for m in microbatches:
    b = BATCH // m
    args = jax.device_put((one_stage, x_BxLxD[:b], pos_BxL[:b]),
                          jax.devices()[0])
    _time(fn, args)  # Compile.
    times[m] = statistics.median(_time(fn, args) for _ in range(runs))
  return times


def _reference_in_one_core(runs: int,
                           microbatches: list[int]) -> dict[int, float]:
  cpu = min(os.sched_getaffinity(0))
  # -m: a script's own folder first on sys.path would let benchmarks/*.py
  # shadow modules that jax imports (`compression`).
  out = common.run(
      [sys.executable, "-m", "benchmarks.pipeline_bubble", "--reference",
       f"--runs={runs}",
       "--microbatches=" + ",".join(map(str, microbatches))],
      preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
  return {int(m): t for m, t in json.loads(out.stdout.splitlines()[-1]).items()}


def measure(runs: int, microbatches: list[int]) -> list[dict]:
  import jax  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

  from lm.parallel import mesh as mesh_lib, pipeline  # noqa: PLC0415

  t_mb = _reference_in_one_core(runs, microbatches)
  layer_fn, params, x_BxLxD, pos_BxL = _setup()
  mesh = mesh_lib.make_mesh(dict(stage=STAGES))
  staged = jax.tree.map(
      lambda a: jax.device_put(a, NamedSharding(mesh, P("stage"))), params)
  rows = []
  for m in microbatches:
    b = BATCH // m
    cases = dict(pipe=(_gpipe_fn(layer_fn, m), (staged, x_BxLxD, pos_BxL)),
                 mb_pp=(_gpipe_fn(layer_fn, 1),
                        (staged, x_BxLxD[:b], pos_BxL[:b])))
    for fn, args in cases.values():
      _time(fn, args, mesh)  # Compile.
    times = {name: [] for name in cases}
    for _ in range(runs):
      for name, (fn, args) in cases.items():
        times[name].append(_time(fn, args, mesh))
    rows.append(dict(
        microbatches=m, theory=pipeline.bubble_fraction(STAGES, m),
        t_pipe_s=statistics.median(times["pipe"]), t_mb_s=t_mb[m],
        # Both stages in turn: T_mb,pp is this divided by S.
        t_mb_pp_program_s=statistics.median(times["mb_pp"])))
    print(f"M={m}: T_pipe {rows[-1]['t_pipe_s'] * 1e3:.1f} ms, T_mb "
          f"{t_mb[m] * 1e3:.1f} ms, T_mb,pp "
          f"{rows[-1]['t_mb_pp_program_s'] / STAGES * 1e3:.1f} ms",
          file=sys.stderr, flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=20,
                      help="timed calls per median")
  parser.add_argument("--microbatches",
                      default=",".join(map(str, MICROBATCHES)),
                      help="the values of M, comma-separated")
  common.add_out_flag(parser, NAME)
  parser.add_argument("--reference", action="store_true",
                      help="print T_mb for each M as JSON (the child process)")
  args = parser.parse_args()
  microbatches = [int(m) for m in args.microbatches.split(",")]
  bad = [m for m in microbatches if m < 1 or BATCH % m]
  if bad:
    parser.error(f"--microbatches: {bad} do not divide the batch {BATCH}")
  # Before jax is imported: one simulated device per stage.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count="
                             f"{STAGES}")
  if args.reference:
    print(json.dumps(reference_times(args.runs, microbatches)))
    return
  rows = measure(args.runs, microbatches)
  path = common.write(NAME, dict(
      rows=rows, runs=args.runs, stages=STAGES, model=MODEL, batch=BATCH,
      length=LENGTH, dtype="float32",
      # Other processes skew the timings: the load they put on the machine.
      load_average_1min=os.getloadavg()[0]), args.out)
  print(f"wrote {path}")


def tables(results: dict) -> dict[str, str]:
  s, rows = results["stages"], []
  for r in sorted(results["rows"], key=lambda r: r["microbatches"]):
    m, t_pipe, t_mb = r["microbatches"], r["t_pipe_s"], r["t_mb_s"]
    t_mb_pp = r["t_mb_pp_program_s"] / s
    rows.append([m, f"{r['theory']:.3f}", f"{1 - m * t_mb / t_pipe:.3f}",
                 f"{1 - m * t_mb_pp / t_pipe:.3f}", f"{t_pipe * 1e3:.1f}",
                 f"{t_mb * 1e3:.1f}", f"{t_mb_pp * 1e3:.1f}"])
  return {"table": common.markdown(
      ["M", "theory (S-1)/(M+S-1)", "measured 1 - M·T_mb/T_pipe",
       "measured,pp 1 - M·T_mb,pp/T_pipe", "T_pipe ms", "T_mb ms",
       "T_mb,pp ms"], rows, "rrrrrrr")}


if __name__ == "__main__":
  main()
