"""A/B of config variants in one process, their steps interleaved.

  python benchmarks/interleaved.py [--size=bench] [--rounds=3] [--steps=10] \
      'precision.compute_dtype=bfloat16' \
      -- '' 'model.attention_impl=xla' 'model.attention_chunks=4'

Arguments before `--` apply to every variant; after it, each argument is one
variant: `;`-separated `key=value` overrides of configs/lm.py:SIZE ('' is the
config as it is). Every variant is compiled first; then each round runs
`steps` steps of each variant in turn (the first 2 of a round untimed), so
drift of a shared machine hits all variants alike. Prints each variant's
median step time, its speed against the first variant, and its compile time.
Differences under ~3% are within this machine's run-to-run noise.

--all_devices lays the config's mesh over every device instead of one, e.g.
the demo's mesh of 8 simulated devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python benchmarks/interleaved.py --size=tiny --all_devices \
      'mesh.data=2' 'mesh.fsdp=2' 'mesh.tensor=2' -- '' 'model.fused_qkv=True'

An exploration tool: it prints its table and writes no JSON, so nothing it
measures is published in the docs (benchmarks/common.py); what the docs
show comes from benchmarks/perf_options.py and the others.
"""
import argparse
import copy
import statistics
import sys
import time

from lm import cpu


def _override(config, overrides: str):
  for item in filter(None, overrides.split(";")):
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    old = node[leaf]
    node[leaf] = ((value == "True") if isinstance(old, bool)
                  else type(old)(value))
  return config


def main():
  cpu.use_huge_pages()  # As a script does: our steps run in this process.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="bench")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--all_devices", action="store_true",
                      help="The config's mesh over every device (default: "
                      "one device).")
  parser.add_argument("common", nargs="*")
  argv = sys.argv[1:]
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])
  variants = argv[split + 1:] or [""]
  common = ";".join(args.common)

  # Here, not at module level: importing a benchmark must stay cheap.
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from configs import lm as lm_config  # noqa: PLC0415
  import lm.config  # noqa: PLC0415
  import lm.parallel  # noqa: PLC0415
  import lm.tasks  # noqa: PLC0415
  import lm.train.state  # noqa: PLC0415
  import lm.train.step  # noqa: PLC0415
  from lm.data import pipeline  # noqa: PLC0415

  base_config = _override(lm_config.get_config(args.size), common)
  devices = jax.devices() if args.all_devices else jax.devices()[:1]
  mesh = lm.parallel.make_mesh(base_config.mesh, devices)
  rng = np.random.default_rng(0)
  runs = []
  with jax.set_mesh(mesh):
    for variant in variants:
      # The engine reads resolved configs (lm/config.py).
      config = lm.config.resolve(
          _override(copy.deepcopy(base_config), variant))
      setup = lm.train.state.make_setup(config, mesh)
      tokens = rng.integers(
          1, config.model.vocab_size,
          (config.train.batch_size, pipeline.seq_len(config) + 1), np.int32)
      batch = {"tokens": jax.device_put(tokens, setup.batch_sharding())}
      state = setup.init_fn(jax.random.key(config.seed))
      fn = lm.train.step.jit_train_step(setup, lm.tasks.get(config),
                                        config.train.grad_accum_steps)
      t = time.perf_counter()
      compiled = fn.lower(state, batch).compile()
      runs.append(dict(name=variant or "(as configured)", fn=compiled,
                       state=state, batch=batch, ms=[],
                       compile_s=time.perf_counter() - t))
    for _ in range(args.rounds):
      for run in runs:
        for i in range(args.steps):
          t = time.perf_counter()
          run["state"], metrics = run["fn"](run["state"], run["batch"])
          jax.block_until_ready((run["state"], metrics))
          if i >= 2:
            run["ms"].append((time.perf_counter() - t) * 1e3)
  first = statistics.median(runs[0]["ms"])
  print(f"common overrides: {common or '(none)'}; {args.rounds} rounds x "
        f"{args.steps - 2} timed steps per variant")
  print("| variant | step time median (ms) | speed vs first | compile (s) |")
  print("|---|---:|---:|---:|")
  for run in runs:
    median = statistics.median(run["ms"])
    print(f"| {run['name']} | {median:.1f} | {first / median:.3f}x | "
          f"{run['compile_s']:.2f} |")


if __name__ == "__main__":
  main()
