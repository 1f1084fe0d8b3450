r"""The collectives each parallelism strategy puts in the compiled tiny LM.

    python benchmarks/collectives.py [--only=ring_sequence4,...]

For each strategy (a mesh over 8 simulated CPU devices, or a prefix of them,
and the config overrides it needs) three programs are compiled, never run:
  forward:     the model's logits for a (16, 32) token batch;
  loss:        the LM loss of a (16, 33) batch (forward only);
  train step:  lm.train.step.compile_train_step (forward, backward, update).
lm.parallel.inspect.count_collectives counts the collectives XLA put in each
compiled program by kind (an async start/done pair counts once; a collective
inside a loop counts once, however many times the loop runs). The model is
tests/conftest.py's tiny_config shrinking of configs/lm.py:tiny (d_model 64,
4 heads, d_ff 128, length 32, batch 16), compiled at two layer counts N
(2 and 4; GPipe: 4 and 8, so that every stage has a layer): the table
writes a count c(N) as aN + b when the two fit such a line, which says
which collectives come once per layer and which once per program.
"""
from __future__ import annotations

import argparse
import math
import os

from benchmarks import common

NAME = "collectives"
DEVICES = 8
# (name, label, mesh axes, config overrides, the two layer counts).
CASES = [
    ("tensor2", "tensor=2", dict(tensor=2), {}, (2, 4)),
    ("fsdp8", "fsdp=8", dict(fsdp=8), {}, (2, 4)),
    ("data8", "data=8", dict(data=8), {}, (2, 4)),
    ("data8_reduce_scatter", "data=8, grad_reduce=reduce_scatter",
     dict(data=8), {"train.grad_reduce": "reduce_scatter"}, (2, 4)),
    # n >= 4: at n = 2 XLA unrolls the one-step ring loop and shares the
    # layers' identical position hops (tests/parallel/test_inspect.py).
    ("ring_sequence4", "sequence=4, ring", dict(sequence=4), {}, (2, 4)),
    ("ring_sequence8", "sequence=8, ring", dict(sequence=8), {}, (2, 4)),
    ("all_gather_sequence8", "sequence=8, all-gather", dict(sequence=8),
     {"model.context_parallel": "all_gather"}, (2, 4)),
    ("moe_expert8", "expert=8, MoE (8 experts)", dict(expert=8),
     {"model.moe.experts": 8}, (2, 4)),
    ("moe_data2_expert4", "data=2 x expert=4, MoE (8 experts)",
     dict(data=2, expert=4), {"model.moe.experts": 8}, (2, 4)),
    ("gpipe_stage2", "stage=2, GPipe (4 microbatches)", dict(stage=2),
     {"model.scan_layers": True, "train.microbatches": 4}, (4, 8)),
    ("gpipe_stage4", "stage=4, GPipe (4 microbatches)", dict(stage=4),
     {"model.scan_layers": True, "train.microbatches": 4}, (4, 8)),
]
PROGRAMS = ("forward", "loss", "train_step")


def tiny_config(mesh: dict, n_layers: int, overrides: dict):
  """tests/conftest.py's tiny_config: configs/lm.py:tiny shrunk to compile
  in seconds, on `mesh`, resolved and checked."""
  from configs import lm  # noqa: PLC0415
  from lm.run import checks  # noqa: PLC0415
  from lm.parallel import AXES  # noqa: PLC0415
  c = lm.get_config("tiny")
  c.model.update(d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                 d_ff=128, max_len=32)
  c.train.update(steps=3, batch_size=16, eval_every=0, checkpoint_every=0)
  c.optimizer.update(warmup_steps=1)
  c.mesh = {a: mesh.get(a, 1) for a in AXES}
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  config, _ = checks.validate(c, num_devices=math.prod(c.mesh.values()))
  return config


def count(mesh_shape: dict, n_layers: int, overrides: dict) -> dict:
  """{program: {collective kind: count}} for one strategy and layer count."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from lm import tasks  # noqa: PLC0415
  from lm.parallel import inspect, make_mesh  # noqa: PLC0415
  from lm.train import state as state_lib, step as step_lib  # noqa: PLC0415

  config = tiny_config(mesh_shape, n_layers, overrides)
  mesh = make_mesh(config.mesh,
                   jax.devices()[:math.prod(config.mesh.values())])
  task = tasks.get(config)
  batch, length = config.train.batch_size, config.model.max_len
  with jax.set_mesh(mesh):
    setup = state_lib.make_setup(config, mesh)
    params = setup.abstract_state.params

    def tokens(n):
      return jax.ShapeDtypeStruct((batch, n), jnp.int32,
                                  sharding=setup.batch_sharding())

    forward = jax.jit(lambda p, t: nnx.merge(setup.graphdef, p)(t)[0])
    loss = jax.jit(lambda p, t: task.loss(nnx.merge(setup.graphdef, p),
                                          {"tokens": t}, None)[0])
    compiled = {
        "forward": forward.lower(params, tokens(length)).compile(),
        "loss": loss.lower(params, tokens(length + 1)).compile(),
        "train_step": step_lib.compile_train_step(
            setup, task, config.train.grad_accum_steps)}
  return {name: inspect.count_collectives(c.as_text())
          for name, c in compiled.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="",
                      help="comma-separated cases to measure (default all): "
                      + ", ".join(c[0] for c in CASES))
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  only = common.parse_only(parser, args.only, [c[0] for c in CASES])
  # Before jax is imported: the strategies need up to 8 devices.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count="
                             f"{DEVICES}")
  cases = {}
  for name, label, mesh_shape, overrides, layer_counts in CASES:
    if only and name not in only:
      continue
    counts = {str(n): count(mesh_shape, n, overrides) for n in layer_counts}
    cases[name] = dict(label=label, mesh=mesh_shape, overrides=overrides,
                       counts=counts)
    print(name, counts, flush=True)
  path = common.write(NAME, {"cases": cases, "devices": DEVICES}, args.out)
  print(f"wrote {path}")


def _per_layer(by_n: dict[int, int]) -> str:
  """c(N) at two layer counts as 'aN + b' when that fits (a, b >= 0
  integers), else each count with its N."""
  (n1, c1), (n2, c2) = sorted(by_n.items())
  a, rest = divmod(c2 - c1, n2 - n1)
  b = c1 - a * n1
  if rest or a < 0 or b < 0:
    return " / ".join(f"{c} at N={n}" for n, c in sorted(by_n.items()))
  if a == 0:
    return str(b)
  return f"{a if a > 1 else ''}N" + (f" + {b}" if b else "")


def _cell(counts: dict[str, dict], program: str) -> str:
  by_kind = {}
  for n, programs in counts.items():
    for kind, c in programs[program].items():
      by_kind.setdefault(kind, {n_: 0 for n_ in map(int, counts)})[int(n)] = c
  return ", ".join(f"{_per_layer(by_kind[kind])} {kind}"
                   for kind in sorted(by_kind)) or "none"


def tables(results: dict) -> dict[str, str]:
  # In CASES order (the JSON's keys are sorted).
  cases = [results["cases"][c[0]] for c in CASES if c[0] in results["cases"]]
  rows = [[case["label"]] + [_cell(case["counts"], p) for p in PROGRAMS]
          for case in cases]
  return {"table": common.markdown(
      ["strategy (N layers)", "forward (logits)", "loss (forward)",
       "train step"], rows)}


if __name__ == "__main__":
  main()
