r"""Memory per device of context parallelism: XLA's compiled temporaries.

    python benchmarks/context_memory.py

Nothing runs or trains: each program is compiled for simulated CPU devices
and `compiled.memory_analysis().temp_size_in_bytes` read off (the buffers
XLA allocates per device beyond the arguments and outputs).

attention: forward + backward of causal attention alone
  (lm.parallel.context.attention; B = 1, 2 query heads sharing 1 kv head
  of dim 8, float32; the loss sum(out * cotangent), gradients of q, k, v),
  as tests/parallel/test_context.py measures it: ring and all-gather
  attention over a sequence=n mesh (n = 2, 4, 8) at L = 4096, plain
  attention at n = 1, then L = 8192, 16384, 32768 at n = 8 (the ring's
  temporaries grow linearly in L, the all-gather's quadratically). 8
  simulated devices, the mesh on the first n.
long_step: the whole configs/lm.py:long train step (4096-token windows,
  batch 8, remat full) on mesh sequence=n x data=1, n = 1, 2, 4, 8, with
  unrolled and with scanned layers (--config.model.scan_layers=True); each
  n in a child process simulating exactly n devices, as
  `XLA_FLAGS=--xla_force_host_platform_device_count=$n python
  scripts/inspect_sharding.py --config=configs/lm.py:long
  --config.mesh.sequence=$n --config.mesh.data=1 --noparams` does.

The defaults are the settings above; --length, --growth, --long_length,
--sequence and --tables exist to shrink the work when checking the script.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks import common

NAME = "context_memory"
IMPLS = ("ring", "all_gather")
TABLES = ("attention", "long_step")


def _simulate(devices: int, base_flags: str) -> None:
  """Simulated CPU devices: set before jax is imported."""
  os.environ["XLA_FLAGS"] = (
      f"{base_flags} --xla_force_host_platform_device_count={devices}")


def attention_temp_bytes(impl: str, length: int, n: int) -> int:
  """Attention forward + backward compiled for a sequence=n mesh
  (tests/parallel/test_context.py's _train_temp_bytes)."""
  import functools  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from lm.parallel import context, make_mesh  # noqa: PLC0415

  shapes = [((1, length, 2, 8), jnp.float32), ((1, length, 1, 8), jnp.float32),
            ((1, length, 1, 8), jnp.float32), ((1, length), jnp.int32),
            ((1, length, 2, 8), jnp.float32)]
  args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  attend = functools.partial(context.attention, causal=True, impl=impl)
  loss = lambda q, k, v, pos, ct: jnp.sum(  # noqa: E731
      attend(q, k, v, pos) * ct)
  with jax.set_mesh(make_mesh(dict(sequence=n), jax.devices()[:n])):
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
        *args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def long_step_memory(n: int, scan_layers: bool, length: int) -> dict:
  """The configs/lm.py:long train step on sequence=n x data=1 over all
  (n) devices, compiled as scripts/inspect_sharding.py compiles it."""
  import jax  # noqa: PLC0415

  from configs import lm  # noqa: PLC0415
  from lm import tasks  # noqa: PLC0415
  from lm.parallel import make_mesh  # noqa: PLC0415
  from lm.run import checks  # noqa: PLC0415
  from lm.train import state as state_lib, step as step_lib  # noqa: PLC0415

  c = lm.get_config("long")
  c.mesh.update(sequence=n, data=1)
  c.model.update(scan_layers=scan_layers, max_len=length)
  config, _ = checks.validate(c)
  mesh = make_mesh(config.mesh, dcn=config.mesh_dcn)
  with jax.set_mesh(mesh):
    setup = state_lib.make_setup(config, mesh)
    compiled = step_lib.compile_train_step(setup, tasks.get(config),
                                           config.train.grad_accum_steps)
  memory = compiled.memory_analysis()
  return dict(temp_bytes=memory.temp_size_in_bytes,
              argument_bytes=memory.argument_size_in_bytes,
              output_bytes=memory.output_size_in_bytes)


def measure_attention(sequence: list[int], length: int,
                      growth: list[int]) -> list[dict]:
  rows = []

  def add(impl, length_, n):
    rows.append(dict(impl="plain" if n == 1 else impl, n=n, length=length_,
                     temp_bytes=attention_temp_bytes(impl, length_, n)))
    print(rows[-1], flush=True)

  for n in sequence:
    for impl in IMPLS[:1] if n == 1 else IMPLS:  # n = 1: no ring, no gather.
      add(impl, length, n)
  for length_ in growth:
    for impl in IMPLS:
      add(impl, length_, max(sequence))
  return rows


def measure_long_step(sequence: list[int], length: int,
                      base_flags: str) -> list[dict]:
  """One child process per (n, scan_layers): each simulates n devices."""
  rows = []
  for scan in (False, True):
    for n in sequence:
      out = common.run(
          # -m: a script's own folder first on sys.path would let
          # benchmarks/*.py shadow modules jax imports (`compression`).
          [sys.executable, "-m", "benchmarks.context_memory",
           f"--child_long_step={n}", f"--long_length={length}",
           *(["--scan_layers"] if scan else [])],
          env=dict(os.environ, XLA_FLAGS=base_flags))
      rows.append(dict(n=n, scan_layers=scan, length=length,
                       **json.loads(out.stdout.splitlines()[-1])))
      print(rows[-1], flush=True)
  return rows


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tables", default=",".join(TABLES),
                      help="which measurements to make, comma-separated")
  parser.add_argument("--sequence", type=_ints, default=[1, 2, 4, 8],
                      help="sequence-axis sizes n (1: plain attention)")
  parser.add_argument("--length", type=int, default=4096,
                      help="attention: L at every n")
  parser.add_argument("--growth", type=_ints, default=[8192, 16384, 32768],
                      help="attention: further L at the largest n")
  parser.add_argument("--long_length", type=int, default=4096,
                      help="long_step: the window (config.model.max_len)")
  common.add_out_flag(parser, NAME)
  # The child process of one long_step measurement (prints it as JSON).
  parser.add_argument("--child_long_step", type=int, default=0,
                      help=argparse.SUPPRESS)
  parser.add_argument("--scan_layers", action="store_true",
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  base_flags = os.environ.get("XLA_FLAGS", "")
  if args.child_long_step:
    _simulate(args.child_long_step, base_flags)
    print(json.dumps(long_step_memory(args.child_long_step, args.scan_layers,
                                      args.long_length)))
    return
  tables_ = [t for t in args.tables.split(",") if t]
  unknown = set(tables_) - set(TABLES)
  if unknown:
    parser.error(f"--tables: unknown {sorted(unknown)}")
  sequence = sorted(args.sequence)
  data = {}
  if "attention" in tables_:
    _simulate(max(sequence), base_flags)
    data["attention"] = measure_attention(sequence, args.length, args.growth)
  if "long_step" in tables_:
    data["long_step"] = measure_long_step(sequence, args.long_length,
                                          base_flags)
  print(f"wrote {common.write(NAME, data, args.out)}")


def _attention_table(rows: list[dict]) -> str:
  temp = {(r["impl"], r["n"], r["length"]): r["temp_bytes"] for r in rows}
  shapes = sorted({(r["n"], r["length"]) for r in rows})

  def cell(impl, n, length):
    if (impl, n, length) not in temp:
      return ""
    text = f"{temp[impl, n, length]:,} B"
    # Growth rows: the factor over the half-length run at the same n.
    if (impl, n, length // 2) in temp:
      text += f" ({temp[impl, n, length] / temp[impl, n, length // 2]:.1f}x)"
    return text

  return common.markdown(
      ["sequence n", "L", "ring", "all-gather", "plain attention (n = 1)"],
      [[n, f"{length:,}", *(cell(impl, n, length)
                            for impl in ("ring", "all_gather", "plain"))]
       for n, length in shapes], "rrrrr")


def _long_step_table(rows: list[dict]) -> str:
  ns = sorted({r["n"] for r in rows})
  temp = {(r["scan_layers"], r["n"]): r["temp_bytes"] for r in rows}
  mib = lambda scan, n: (f"{temp[scan, n] / 2**20:,.0f} MiB"  # noqa: E731
                         if (scan, n) in temp else "")
  return common.markdown(
      ["sequence n"] + [f"{n} (plain attention)" if n == 1 else str(n)
                        for n in ns],
      [["temporaries per device"] + [mib(False, n) for n in ns],
       ["with scan_layers=True"] + [mib(True, n) for n in ns]],
      "l" + "r" * len(ns))


def tables(results: dict) -> dict[str, str]:
  out = {}
  if "attention" in results:
    out["attention"] = _attention_table(results["attention"])
  if "long_step" in results:
    out["long_step"] = _long_step_table(results["long_step"])
  return out


if __name__ == "__main__":
  main()
