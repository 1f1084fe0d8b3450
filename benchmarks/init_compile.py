r"""The init program's compile time on a CPU: XLA's default LLVM optimization
(level 3) against the level lm/train/state.py compiles it with.

    python benchmarks/init_compile.py [--rounds=3]

For each case, fresh processes alternate between the two, `rounds` times
each. A process builds the case's Setup, then traces, lowers and compiles
its init (`Setup.init_fn` as shipped, or the same function jitted with XLA's
defaults), runs it twice, and reports the compile seconds, the second run's
seconds and a hash of every state array's bits. The two compiles' hashes
must agree, or this fails: the option may only change how long the compile
and the run take. Medians over the rounds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys

from benchmarks import common

NAME = "init_compile"
# case -> (configs/lm.py preset, overrides, simulated devices).
CASES = {
    "tiny (8 devices)": ("tiny", {}, 8),
    "demo (8 devices)": ("demo", {}, 8),
    "bench (1 device)": ("bench", {}, 1),
    # The run time of a larger init (67M parameters), where a less optimized
    # random-number kernel would show.
    "tiny, d_model 1024 (8 devices)": (
        "tiny", {"d_model": 1024, "d_ff": 4096, "n_heads": 16,
                 "n_kv_heads": 16}, 8),
}
COMPILES = ("default", "ours")


def child(case: str, compile_: str) -> dict:
  """Runs in a fresh process: one compile and two runs of the init."""
  import time  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  import lm.parallel  # noqa: PLC0415
  from configs import lm as presets  # noqa: PLC0415
  from lm.run import checks  # noqa: PLC0415
  from lm.train import state as state_lib  # noqa: PLC0415
  preset, model, devices = CASES[case]
  config = presets.get_config(preset)
  config.model.update(model)
  config, _ = checks.validate(config, num_devices=devices)
  mesh = lm.parallel.make_mesh(config.mesh, jax.devices()[:devices])
  with jax.set_mesh(mesh):
    setup = state_lib.make_setup(config, mesh)
    init = setup.init_fn if compile_ == "ours" else jax.jit(
        setup.init_fn.__wrapped__, out_shardings=setup.state_shardings)
    key = jax.random.key(config.seed)
    start = time.perf_counter()
    compiled = init.lower(key).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(key))
    start = time.perf_counter()
    state = jax.block_until_ready(compiled(key))
    run_s = time.perf_counter() - start
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(state)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return {"compile_s": compile_s, "run_s": run_s,
          "params": state_lib.count_params(state.params),
          "sha256": digest.hexdigest()}


def measure(case: str, rounds: int) -> dict:
  runs = {c: [] for c in COMPILES}
  for _ in range(rounds):
    for compile_ in COMPILES:  # Alternating: the machine is shared.
      out = common.run(
          [sys.executable, __file__, f"--child={case}", f"--as={compile_}"],
          env=common.simulated_devices(CASES[case][2])).stdout
      runs[compile_].append(json.loads(out.strip().splitlines()[-1]))
  hashes = {r["sha256"] for c in COMPILES for r in runs[c]}
  if len(hashes) != 1:
    raise RuntimeError(f"{case}: the init's bits differ between compiles")
  return {"params": runs["ours"][0]["params"], "rounds": rounds,
          **{c: {k: statistics.median(r[k] for r in runs[c])
                 for k in ("compile_s", "run_s")} for c in COMPILES}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
  parser.add_argument("--as", dest="as_", choices=COMPILES,
                      help=argparse.SUPPRESS)
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.as_)))
    return
  from lm.train import state as state_lib  # noqa: PLC0415
  cases = {}
  for case in CASES:
    cases[case] = measure(case, args.rounds)
    print(case, json.dumps(cases[case]))
  data = {"cases": cases, "options": state_lib.INIT_CPU_COMPILER_OPTIONS}
  print(f"wrote {common.write(NAME, data, args.out)}")


def tables(results: dict) -> dict[str, str]:
  rows = []
  for case, r in results["cases"].items():
    default, ours = r["default"], r["ours"]
    rows.append([case, f"{r['params'] / 1e6:.1f}M",
                 f"{default['compile_s']:.2f}", f"{ours['compile_s']:.2f}",
                 f"{1 - ours['compile_s'] / default['compile_s']:.0%}",
                 f"{default['run_s'] * 1e3:.0f}", f"{ours['run_s'] * 1e3:.0f}"])
  return {"table": common.markdown(
      ["init of configs/lm.py:", "parameters", "compile, XLA default (s)",
       "compile, ours (s)", "saved", "run, XLA default (ms)",
       "run, ours (ms)"], rows, "lrrrrrr")}


if __name__ == "__main__":
  main()
