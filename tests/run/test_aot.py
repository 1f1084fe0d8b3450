"""Planning for a TPU slice by compiling for it (lm/run/aot.py): the tiny LM
compiles for a v5e slice; the compiled memory per chip is what the
parameter and optimizer-state shapes and shardings say; the collectives our
code writes are the ones the simulated CPU mesh shows; bad input is one
line before any compile. Needs libtpu (requirements-test.txt)."""
import copy
import math
import os
import subprocess
import sys

import jax
import pytest

from conftest import REPO, tiny_config
from lm import tasks
from lm.parallel import inspect, make_mesh, rules as rules_lib
from lm.run import aot, aot_search, checks as run_checks
from lm.train import state as state_lib, step as step_lib

pytest.importorskip("libtpu", reason="the TPU compiler (requirements-test)")


@pytest.fixture(scope="module")
def v5e_2x2():
  return aot.target("v5e:2x2")


@pytest.fixture(scope="module")
def v5e_2x4():
  return aot.target("v5e:2x4")


def test_the_tiny_preset_compiles_for_a_v5e_slice(v5e_2x2):
  from configs import lm  # noqa: PLC0415
  plan = aot.plan(lm.get_config("tiny"), v5e_2x2, estimate=False)
  assert v5e_2x2.chips == len(v5e_2x2.devices) == 4
  # The compiler's own usable HBM: a little under the data sheet's 16 GiB.
  assert 0.9 * 16 * 2**30 < v5e_2x2.hbm_bytes <= 16 * 2**30
  assert plan.fits and 0 < plan.needed_bytes < v5e_2x2.hbm_bytes
  assert plan.mesh["data"] == 4
  # Data parallelism: the gradients, reduced in one all-reduce.
  assert plan.collectives == {"all-reduce": 1}
  assert "--config.mesh.data=4" in plan.overrides


def _analytic_state_bytes(abstract_params, mesh) -> int:
  """Parameters + AdamW's two moments, float32, on one chip: each
  dimension divided by the mesh axes its spec names."""
  total = 0
  for x in jax.tree.leaves(abstract_params):
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    shard = 1
    for dim, axes in zip(x.shape, spec):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      shard *= dim // math.prod(mesh.shape[a] for a in names)
    total += shard * 4
  return 3 * total


def test_compiled_memory_is_the_state_over_the_chips(v5e_2x2):
  # Widths a multiple of 128 on every chip, so the TPU's (8, 128) tiles add
  # no padding to the arrays.
  config = tiny_config(mesh=dict(data=1, fsdp=4))
  config.model.update(d_model=512, n_heads=4, n_kv_heads=4, d_ff=1024)
  plan = aot.plan(config, v5e_2x2, estimate=False)
  config, _ = aot.validate(config, v5e_2x2)
  setup = aot.setup_for(config, v5e_2x2)
  analytic = _analytic_state_bytes(setup.abstract_state.params, setup.mesh)
  whole = _analytic_state_bytes(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding
                                     .NamedSharding(setup.mesh, jax.P())),
      setup.abstract_state.params), setup.mesh)
  assert analytic == pytest.approx(whole / 4, rel=0.02)  # FSDP splits it.
  # The arguments are the state (and a 16 x 33 batch of token ids).
  assert plan.memory["arguments"] == pytest.approx(analytic, rel=0.10)
  assert plan.state_bytes == pytest.approx(analytic, rel=0.01)


def test_the_estimate_is_the_compilers_for_the_whole_depth(v5e_2x2):
  """Extrapolated from one- and two-layer probes (the scanned layers are a
  loop, whose body XLA's cost model counts once), the estimate is what the
  compiler says of the same step with all three layers unrolled."""
  config = tiny_config(mesh=dict(data=1, fsdp=4))
  config.model.update(n_layers=3, d_model=128, n_heads=2, n_kv_heads=2,
                      d_ff=256, scan_layers=True, remat="full")
  config.precision.compute_dtype = "bfloat16"
  plan = aot.plan(config, v5e_2x2)
  unrolled = copy.deepcopy(config)
  unrolled.model.scan_layers = False
  unrolled, _ = aot.validate(unrolled, v5e_2x2)
  _, compiled, _ = aot.train_program(unrolled, v5e_2x2)
  cost = compiled.cost_analysis()
  assert plan.estimate_s == pytest.approx(cost["optimal_seconds"], rel=0.05)
  assert plan.xla_flops == pytest.approx(cost["flops"], rel=0.01)
  assert 0 < plan.mfu < 1


# Meshes of 8 chips whose collectives our code writes itself (the gradient
# all-reduce of data parallelism, the pipeline's and the ring's ppermutes,
# the experts' all_to_alls) or which XLA's CPU and TPU partitioners place
# alike (Megatron's all-reduces under a pipeline). FSDP's all-gathers are
# left to each backend: the TPU compiler gathers each weight again for the
# backward pass (28 for 15 weights of the tiny LM) where XLA:CPU keeps it.
COLLECTIVE_CASES = [
    (dict(data=8), {}, None),
    (dict(data=1, stage=2, tensor=4), dict(scan_layers=True),
     None),
    (dict(data=1, sequence=4, fsdp=2), {}, ("collective-permute",)),
    (dict(data=2, expert=4), "moe", ("all-to-all",)),
]


def _cpu_collectives(config) -> dict[str, int]:
  config, _ = run_checks.validate(copy.deepcopy(config), num_devices=8)
  mesh = make_mesh(config.mesh, jax.devices()[:8])
  with rules_lib.use(rules_lib.Rules()), jax.set_mesh(mesh):
    setup = state_lib.make_setup(config, mesh)
    compiled = step_lib.compile_train_step(setup, tasks.get(config), 1)
  return inspect.count_collectives(compiled.as_text())


@pytest.mark.parametrize("mesh,model,kinds", COLLECTIVE_CASES,
                         ids=["data", "stage-tensor", "sequence", "expert"])
def test_collectives_match_the_simulated_cpu_mesh(mesh, model, kinds,
                                                  v5e_2x4):
  if model == "moe":
    from configs import lm  # noqa: PLC0415
    config = lm.get_config("moe")
    config.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                        d_ff=128, max_len=64)
    config.train.batch_size = 16
  else:
    config = tiny_config()
    config.model.update(max_len=64, **model)
  config.mesh.update(mesh)
  if mesh.get("stage", 1) > 1:
    config.train.microbatches = 2
  tpu = aot.plan(config, v5e_2x4, estimate=False).collectives
  cpu = _cpu_collectives(config)
  if kinds is None:
    assert tpu == cpu
  else:
    assert {k: tpu.get(k) for k in kinds} == {k: cpu.get(k) for k in kinds}
    assert all(cpu.get(k) for k in kinds)


def test_a_search_enumerates_every_factorization():
  meshes = aot_search.meshes(8, ("data", "fsdp", "tensor"))
  # 8 = 2^3 over 3 axes: C(3 + 2, 2) = 10 ordered factorizations.
  assert len(meshes) == 10
  assert all(math.prod(m.values()) == 8 for m in meshes)
  assert {tuple(m.values()) for m in meshes} >= {(8, 1, 1), (1, 8, 1),
                                                 (2, 2, 2), (1, 1, 8)}


def test_a_search_ranks_fitting_plans_by_the_estimate():
  def plan(fits, estimate, needed=1):
    return aot.Plan(topology="t", mesh={}, overrides=[], fits=fits,
                    needed_bytes=needed, hbm_bytes=2, state_bytes=0,
                    compile_s=0, estimate_s=estimate)
  slow, fast, unknown = plan(True, 2.0), plan(True, 1.0), plan(True, None)
  over = plan(False, None, needed=3)
  assert aot_search.ranked([over, unknown, slow, fast]) == [fast, slow, unknown,
                                                     over]


def test_a_search_refines_the_meshes_it_can_rank():
  def plan(fits, estimate, needed, state=1):
    return aot.Plan(topology="t", mesh={}, overrides=[], fits=fits,
                    needed_bytes=needed, hbm_bytes=10, state_bytes=state,
                    compile_s=0, estimate_s=estimate)
  ring = plan(True, None, 5)  # Fits, but cannot be estimated.
  near, far = plan(False, 3.0, 11), plan(False, 2.0, 30)
  fast = plan(True, 1.0, 9)
  assert aot_search._most_promising([ring, far, near, fast], 3) == [
      fast, far, near]
  assert aot_search._most_promising([ring, far, near], 2) == [far, near]
  # 4 microbatches can at best quarter the activations, not the state.
  assert not aot_search._hopeless(plan(False, None, 37, state=1), 1, 4)
  assert aot_search._hopeless(plan(False, None, 38, state=1), 1, 4)
  assert aot_search._hopeless(plan(False, None, 12, state=11), 2, 4)


def _script(*args: str):
  env = dict(os.environ, XLA_FLAGS="")
  return subprocess.run(
      [sys.executable, "scripts/aot_compile.py", *args], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=300)


def _one_line(result, *fragments: str) -> str:
  output = result.stdout + result.stderr
  assert result.returncode == 1, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), output[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


@pytest.mark.parametrize("args,fragments", [
    (["--topology=v9z:2x2"], ["--topology='v9z:2x2'", "v5e:2x2"]),
    (["--topology=v5e:3x3"], ["--topology='v5e:3x3'", "lay out"]),
    (["--topology=v5e:2x2", "--config.mesh.data=3"],
     ["config.mesh", "4 devices"]),
], ids=["unknown-generation", "bad-shape", "mesh"])
def test_bad_input_is_one_line_before_any_compile(args, fragments):
  result = _script("--config=configs/lm.py:tiny", *args)
  _one_line(result, *fragments)
  assert "compiled in" not in result.stdout


def test_a_step_that_does_not_fit_names_the_shortfall_and_the_knobs():
  # The 8B model's float32 parameters and Adam moments alone (96 GiB) are
  # more than four 16 GiB chips hold.
  result = _script("--config=configs/lm.py:8b", "--topology=v5e:2x2",
                   "--config.train.batch_size=4", "--noestimate")
  line = _one_line(result, "does not fit on v5e:2x2", "GiB over",
                   "config.mesh.fsdp", "config.model.remat",
                   "config.train.grad_accum_steps", "config.train.batch_size")
  needed = float(line.split("needs ")[1].split(" GiB")[0])
  assert needed > 96 / 4
