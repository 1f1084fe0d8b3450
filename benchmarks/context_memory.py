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

The flags below the defaults (--length, --growth, --long_length, --sequence,
--tables) only shrink the work to check the script itself.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import app, flags

from benchmarks import common

NAME = "context_memory"
IMPLS = ("ring", "all_gather")

_TABLES = flags.DEFINE_list("tables", ["attention", "long_step"],
                            "Which measurements to make.")
_SEQUENCE = flags.DEFINE_list("sequence", ["1", "2", "4", "8"],
                              "Sequence-axis sizes n (1: plain attention).")
_LENGTH = flags.DEFINE_integer("length", 4096, "attention: L at every n.")
_GROWTH = flags.DEFINE_list("growth", ["8192", "16384", "32768"],
                            "attention: further L at the largest n.")
_LONG_LENGTH = flags.DEFINE_integer(
    "long_length", 4096, "long_step: the window (config.model.max_len).")
_OUT = flags.DEFINE_string("out", str(common.RESULTS / f"{NAME}.json"),
                           "Where the results go.")
# The child process of one long_step measurement (prints it as JSON).
_CHILD = flags.DEFINE_integer("child_long_step", 0,
                              "Internal: measure the long step at this n.")
_SCAN = flags.DEFINE_boolean("scan_layers", False,
                             "Internal: the child's config.model.scan_layers.")


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
  loss = lambda q, k, v, pos, ct: jnp.sum(attend(q, k, v, pos) * ct)  # noqa: E731
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
           f"--child_long_step={n}", f"--scan_layers={scan}",
           f"--long_length={length}"],
          env=dict(os.environ, XLA_FLAGS=base_flags))
      rows.append(dict(n=n, scan_layers=scan, length=length,
                       **json.loads(out.stdout.splitlines()[-1])))
      print(rows[-1], flush=True)
  return rows


def main(argv):
  del argv
  base_flags = os.environ.get("XLA_FLAGS", "")
  if _CHILD.value:
    _simulate(_CHILD.value, base_flags)
    print(json.dumps(long_step_memory(_CHILD.value, _SCAN.value,
                                      _LONG_LENGTH.value)))
    return
  out = Path(_OUT.value).resolve()
  if out.name != f"{NAME}.json":
    raise app.UsageError(f"--out must name a file {NAME}.json")
  unknown = set(_TABLES.value) - {"attention", "long_step"}
  if unknown:
    raise app.UsageError(f"--tables: unknown {sorted(unknown)}")
  sequence = sorted(int(n) for n in _SEQUENCE.value)
  data = {}
  if "attention" in _TABLES.value:
    _simulate(max(sequence), base_flags)
    data["attention"] = measure_attention(
        sequence, _LENGTH.value, [int(x) for x in _GROWTH.value])
  if "long_step" in _TABLES.value:
    data["long_step"] = measure_long_step(sequence, _LONG_LENGTH.value,
                                          base_flags)
  common.RESULTS = out.parent  # common.write names the file; --out its place.
  print(f"wrote {common.write(NAME, data)}")


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
  app.run(main)
