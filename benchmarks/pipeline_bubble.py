r"""GPipe's measured pipeline bubble against theory, (S-1)/(M+S-1).

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
interleaved so that load from other processes hits them alike.

python benchmarks/pipeline_bubble.py [--runs=20]
"""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import contextlib
import json
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lm.models import transformer
from lm.parallel import mesh as mesh_lib
from lm.parallel import pipeline

STAGES = 2
MICROBATCHES = (1, 2, 4, 8, 16)
CFG = transformer.Config(vocab_size=256, max_len=64, d_model=256,
                         n_layers=4, n_heads=4, n_kv_heads=4, d_ff=1024,
                         scan_layers=True)
BATCH, LENGTH = 16, 64


def _fwd_bwd(apply):
  """jit(grad of a sum-of-squares loss w.r.t. params and input)."""
  loss = lambda p, x, pos: jnp.mean(apply(p, x, pos) ** 2)  # noqa: E731
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _gpipe_fn(layer_fn, m: int):
  # Outside a mesh, gpipe is the plain scan over the layers it is given.
  return _fwd_bwd(lambda p, x, pos: pipeline.gpipe(
      layer_fn, p, x, pos, microbatches=m))


def _time(fn, args, mesh=None) -> float:
  with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _setup():
  model = transformer.Model(CFG, nnx.Rngs(0))
  graphdef, state = nnx.split(model.transformer.blocks)
  layer_fn = lambda p, x, pos: nnx.merge(graphdef, p)(x, pos)[0]  # noqa: E731
  x_BxLxD = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, CFG.d_model))
  pos_BxL = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32),
                             (BATCH, LENGTH))
  return layer_fn, nnx.to_pure_dict(state), x_BxLxD, pos_BxL


def reference_times(runs: int) -> dict[int, float]:
  """T_mb for each M: one stage's layers on one microbatch, one device."""
  layer_fn, params, x_BxLxD, pos_BxL = _setup()
  one_stage = jax.tree.map(lambda a: a[:CFG.n_layers // STAGES], params)
  fn, times = _gpipe_fn(layer_fn, 1), {}
  for m in MICROBATCHES:
    b = BATCH // m
    args = jax.device_put((one_stage, x_BxLxD[:b], pos_BxL[:b]),
                          jax.devices()[0])
    _time(fn, args)  # Compile.
    times[m] = statistics.median(_time(fn, args) for _ in range(runs))
  return times


def _reference_in_one_core(runs: int) -> dict[int, float]:
  cpu = min(os.sched_getaffinity(0))
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--reference",
       f"--runs={runs}"], check=True, capture_output=True, text=True,
      preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
  return {int(m): t for m, t in json.loads(out.stdout).items()}


def main(runs: int) -> None:
  t_mb = _reference_in_one_core(runs)
  layer_fn, params, x_BxLxD, pos_BxL = _setup()
  mesh = mesh_lib.make_mesh(dict(stage=STAGES))
  staged = jax.tree.map(
      lambda a: jax.device_put(a, NamedSharding(mesh, P("stage"))), params)
  rows = []
  for m in MICROBATCHES:
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
    t_pipe = statistics.median(times["pipe"])
    t_mb_pp = statistics.median(times["mb_pp"]) / STAGES
    rows.append((m, pipeline.bubble_fraction(STAGES, m),
                 1 - m * t_mb[m] / t_pipe, 1 - m * t_mb_pp / t_pipe,
                 t_pipe, t_mb[m], t_mb_pp))
    print(f"M={m}: T_pipe {t_pipe * 1e3:.1f} ms, T_mb {t_mb[m] * 1e3:.1f} ms,"
          f" T_mb,pp {t_mb_pp * 1e3:.1f} ms", file=sys.stderr)

  print(f"GPipe bubble, S={STAGES} stages on 2 simulated CPU devices, "
        f"d_model={CFG.d_model}, d_ff={CFG.d_ff}, {CFG.n_layers} layers, seq "
        f"{LENGTH}, batch {BATCH}, float32, forward + backward, median of "
        f"{runs} runs.\n")
  print("| M | theory (S-1)/(M+S-1) | measured 1 - M*T_mb/T_pipe | "
        "measured,pp 1 - M*T_mb,pp/T_pipe | T_pipe ms | T_mb ms | "
        "T_mb,pp ms |\n|---|---|---|---|---|---|---|")
  for m, theory, measured, measured_pp, t_pipe, t_mb_, t_mb_pp in rows:
    print(f"| {m} | {theory:.3f} | {measured:.3f} | {measured_pp:.3f} | "
          f"{t_pipe * 1e3:.1f} | {t_mb_ * 1e3:.1f} | {t_mb_pp * 1e3:.1f} |")
  print(f"\nCommand: python benchmarks/pipeline_bubble.py --runs={runs}  "
        f"(1-minute load average at the end: {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores; other processes skew the timings)")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=20)
  parser.add_argument("--reference", action="store_true",
                      help="print T_mb for each M as JSON (the child process)")
  args = parser.parse_args()
  if args.reference:
    print(json.dumps(reference_times(args.runs)))
  else:
    main(args.runs)
