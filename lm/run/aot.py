"""Planning a run for a TPU slice that is not here, by compiling for it.

libtpu's compiler runs on any host, and jax.experimental.topologies
describes a slice's chips without them, so the real train step (the one
scripts/train.py runs: lm/train/step.py) compiles ahead of time for, say,
a v5p:4x4x8 slice from abstract arrays that carry their shardings. What
the compiler says about the program is the plan (`Plan`): memory per chip
against the chip's HBM, the collectives it put in, FLOPs, and its own time
estimate with the MFU that implies. scripts/aot_compile.py prints it;
`search` compiles many (mesh, remat, microbatches) variants and ranks them.

The compiler's time estimate (cost_analysis()["optimal_seconds"]) covers a
loop body once, and the scanned layers and gradient accumulation are loops.
So the estimate comes from two small probes of the same step with the
layers unrolled, one and two layers deep (and one microbatch), extrapolated
to the model's depth: t(n) = t(1) + (n - 1) (t(2) - t(1)), times the
microbatches. A plan whose probes still hold a loop (ring attention, the
GPipe pipeline) gets no estimate rather than a wrong one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np

from lm import backend, checks as base_checks, tasks
from lm.parallel import inspect, make_mesh, mesh as mesh_lib
from lm.parallel import rules as rules_lib
from lm.run import checks, perf
from lm.train import state as state_lib, step as step_lib

GIB = 2**30
# jax's device_kind of each generation, and its HBM per chip as the data
# sheets give it (GB). A plan is held against the compiler's own figure,
# which `usable_hbm` asks for (v5p: 95.74 GiB; v5e: 15.75 GiB).
GENERATIONS = {"v4": ("TPU v4", 32), "v5e": ("TPU v5 lite", 16),
               "v5p": ("TPU v5", 95), "v6e": ("TPU v6 lite", 32)}
TOPOLOGY = re.compile(r"^(?P<gen>[a-z0-9]+):(?P<dims>\d+(x\d+){1,2})$")
# What to change when a plan does not fit, named in the error.
KNOBS = ("config.mesh.fsdp (shard the state over more chips)",
         "config.model.remat (full keeps the least)",
         "config.train.grad_accum_steps (microbatches: same math, less "
         "activation memory)", "config.train.batch_size")
# The compiler's out-of-memory message: what the program needs, what the
# chip has (XLA's human-readable sizes, powers of 1024).
_OOM = re.compile(r"required for HLO temporaries \((?P<need>[\d.]+)(?P<nu>[KMGT]?)"
                  r"\) exceeds available HBM \((?P<have>[\d.]+)(?P<hu>[KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass(frozen=True)
class Target:
  """A TPU slice to compile for."""
  name: str  # As given: "v5p:4x4x8".
  generation: str  # "v5p".
  chips: int
  devices: tuple  # jax devices without hardware (compile only).
  processes: int  # Hosts of the slice (each process feeds its devices).
  hbm_bytes: int  # Usable per device, as the compiler counts it.
  peak_flops: float  # bfloat16 FLOP/s per device (perf.DATASHEET_TFLOPS).

  @property
  def datasheet_hbm_gb(self) -> int:
    """HBM per chip on the data sheet, in GB as it says."""
    return GENERATIONS[self.generation][1]


@contextlib.contextmanager
def _quiet_stderr():
  """Without a TPU, libtpu logs at start-up that it cannot find one (five
  lines on stderr, its own C++ logging): hidden, unless LM_VERBOSE is set.
  Errors still reach the caller as exceptions."""
  if os.environ.get("LM_VERBOSE", "") not in ("", "0"):
    yield
    return
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def target(name: str) -> Target:
  """The slice `name` ("v5e:2x2", "v5p:4x4x8"): its chips from libtpu.
  Raises UsageError (one line) for a name it cannot describe."""
  match = TOPOLOGY.match(name)
  if not match or match["gen"] not in GENERATIONS:
    raise base_checks.UsageError(
        f"--topology={name!r} is not a TPU slice this tool knows; write "
        f"GENERATION:AxB[xC] with GENERATION one of {sorted(GENERATIONS)}, "
        "e.g. v5e:2x2, v6e:16x16, v5p:4x4x8.")
  from jax.experimental import topologies  # noqa: PLC0415
  # libtpu takes a machine-wide lock on load, for the chips; compiling for
  # chips that are not here needs none, and plans (tests in parallel, a
  # search beside a benchmark) may then run side by side.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    with _quiet_stderr():
      devices = topologies.get_topology_desc(
          platform="tpu", topology_name=name).devices
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise base_checks.UsageError(
          "compiling for a TPU needs libtpu: pip install "
          "'jax[tpu]==0.10.2' (requirements-test.txt has it).") from None
    raise base_checks.UsageError(
        f"--topology={name!r}: libtpu cannot lay out that slice: "
        f"{str(e).splitlines()[0]}") from None
  chips = math.prod(int(d) for d in match["dims"].split("x"))
  kind = GENERATIONS[match["gen"]][0]
  per_chip = len(devices) // chips
  peak = perf.DATASHEET_TFLOPS[kind]["bfloat16"] * 1e12 / per_chip
  return Target(name=name, generation=match["gen"], chips=chips,
                devices=tuple(devices),
                processes=len({d.process_index for d in devices}),
                hbm_bytes=usable_hbm(devices[0]), peak_flops=peak)


def usable_hbm(device) -> int:
  """HBM per device as the compiler counts it: it says so when a program
  asks for more, here 1 TiB."""
  mesh = jax.sharding.Mesh(np.array([device]), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.P())
  x = jax.ShapeDtypeStruct((2**38,), "float32", sharding=sharding)
  try:
    jax.jit(lambda a: a + 1, out_shardings=sharding).lower(x).compile()
  except jax.errors.JaxRuntimeError as e:
    oom = _oom(str(e))
    if oom:
      return oom[1]
    raise
  raise AssertionError("a 1 TiB program compiled for one chip")


def _oom(message: str) -> tuple[int, int] | None:
  """(bytes needed, bytes usable) from the compiler's out-of-memory error."""
  m = _OOM.search(message)
  if not m:
    return None
  return (int(float(m["need"]) * _UNITS[m["nu"]]),
          int(float(m["have"]) * _UNITS[m["hu"]]))


@dataclasses.dataclass
class Plan:
  """What the compiler says about one config on one slice. Bytes are per
  device (per chip, except v4, whose chips are two devices here)."""
  topology: str
  mesh: dict[str, int]  # Resolved sizes of every axis.
  overrides: list[str]  # The --config flags that give this plan.
  fits: bool
  needed_bytes: int  # Arguments + outputs - aliased + temporaries.
  hbm_bytes: int  # Usable, the compiler's.
  # What the program keeps between steps (parameters and optimizer
  # state), from the shapes and shardings alone.
  state_bytes: int
  compile_s: float
  memory: dict[str, int] = dataclasses.field(default_factory=dict)
  collectives: dict[str, int] = dataclasses.field(default_factory=dict)
  model_flops: float = 0.0  # Analytic, per device per step.
  xla_flops: float | None = None  # The probes' count, extrapolated.
  estimate_s: float | None = None  # The compiler's step time.
  mfu: float | None = None
  note: str = ""  # Why there is no estimate, or what failed.
  hlo: str = dataclasses.field(default="", repr=False)  # The compiled text.
  key: tuple = dataclasses.field(default=(), repr=False)  # A search's.

  def shortfall_line(self, what: str) -> str:
    """The one line that says a plan does not fit, and what to change."""
    over = (self.needed_bytes - self.hbm_bytes) / GIB
    need = (f"it needs {self.needed_bytes / GIB:.2f} GiB per chip, "
            f"{over:.2f} GiB over the {self.hbm_bytes / GIB:.2f} GiB of HBM "
            "the compiler can use" if self.needed_bytes else
            f"the compiler says: {self.note}")
    return (f"{what} does not fit on {self.topology}: {need}. Change "
            f"{', '.join(KNOBS)}.")


def validate(config, tgt: Target) -> tuple[Any, dict[str, int]]:
  """(resolved config, mesh sizes) for the slice, before any compile:
  every config check, for a TPU, with the slice's chip and host counts."""
  with backend.target("tpu"):
    config, sizes = checks.validate(config, num_devices=len(tgt.devices),
                                    process_count=tgt.processes)
  dcn = {a: s for a, s in config.mesh_dcn.items() if s != 1}
  base_checks.require(not dcn, f"config.mesh_dcn={dcn}: planning covers one "
                      "slice (ICI only); set every config.mesh_dcn axis to 1.")
  return config, sizes


@dataclasses.dataclass(frozen=True)
class Program:
  """A program to plan: the train step (`TRAIN`) or the server's decode
  step (lm/serve/plan.py)."""
  # (validated config, slice) -> (setup, the compiled program or the
  # compiler's out-of-memory error, compile seconds).
  compile: Callable[..., tuple[state_lib.Setup, Any, float]]
  # (config, setup) -> analytic model FLOPs of one step, all devices
  # together; None: no MFU (decoding is bound by memory, not FLOPs).
  flops: Callable[..., float] | None = None
  # Runs config.train.grad_accum_steps microbatches per step.
  microbatched: bool = False
  # What the program keeps between steps, of the setup's abstract state:
  # the parameters and optimizer state (training), the parameters (serving).
  held: Callable[..., Any] = lambda setup: setup.abstract_state


@contextlib.contextmanager
def _not_cached():
  """Keeps compile-only programs out of jax's persistent compilation cache
  (tests set one): they cannot be loaded back (no chips to load them on),
  and a pod-sized one takes tens of MB."""
  key = "jax_persistent_cache_min_compile_time_secs"
  before = getattr(jax.config, key)
  jax.config.update(key, float("inf"))
  try:
    yield
  finally:
    jax.config.update(key, before)


def compiled_or_oom(compile_fn: Callable[[], Any]) -> tuple[Any, float]:
  """compile_fn() timed, with the compiler's out-of-memory error returned
  in place of a program (a plan that does not fit is an answer)."""
  start = time.monotonic()
  with _quiet_stderr(), _not_cached():
    try:
      compiled = compile_fn()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      compiled = e
  return compiled, time.monotonic() - start


def setup_for(config, tgt: Target) -> state_lib.Setup:
  """The train state's abstract arrays and shardings on the slice's mesh.
  Made outside the mesh: make_setup runs small eager ops (the init key, the
  optimizer's abstract state), which the slice's chips cannot run here."""
  mesh = make_mesh(config.mesh, devices=list(tgt.devices))
  with backend.target("tpu"), rules_lib.use(rules_lib.Rules()):
    return state_lib.make_setup(config, mesh)


def train_program(config, tgt: Target
                  ) -> tuple[state_lib.Setup, Any, float]:
  """The train step scripts/train.py runs (lm/train/step.py), compiled for
  the slice from abstract state and batch."""
  setup = setup_for(config, tgt)
  task = tasks.get(config)
  with backend.target("tpu"), rules_lib.use(rules_lib.Rules()), \
      jax.set_mesh(setup.mesh):
    compiled, seconds = compiled_or_oom(lambda: step_lib.compile_train_step(
        setup, task, config.train.grad_accum_steps))
  return setup, compiled, seconds


def train_flops(config, setup) -> float:
  """Analytic model FLOPs of one train step (all devices together)."""
  return tasks.get(config).model_flops_per_step(setup.model_cfg)


def overrides(config, sizes: dict[str, int]) -> list[str]:
  """The --config flags a plan varies: mesh, remat, microbatches."""
  out = [f"--config.mesh.{a}={sizes[a]}" for a in mesh_lib.AXES]
  out.append(f"--config.model.remat={config.model.remat}")
  out.append(f"--config.train.grad_accum_steps="
             f"{config.train.grad_accum_steps}")
  if sizes["stage"] > 1:
    out.append(f"--config.train.microbatches={config.train.microbatches}")
  return out


TRAIN = Program(train_program, train_flops, microbatched=True)


def plan(config, tgt: Target, program: Program = TRAIN, *,
         estimate: bool = True, probes: dict | None = None) -> Plan:
  """Compiles `program` of `config` for `tgt` and reads the plan.
  `probes`: the estimate's probes already compiled (a search's plans share
  them: the microbatch count does not change a probe)."""
  config, sizes = validate(config, tgt)
  setup, compiled, seconds = program.compile(config, tgt)
  _, state = inspect.state_bytes(program.held(setup))
  result = Plan(topology=tgt.name, mesh=sizes,
                overrides=overrides(config, sizes), fits=False,
                needed_bytes=0, hbm_bytes=tgt.hbm_bytes, state_bytes=state,
                compile_s=seconds, model_flops=(
                    program.flops(config, setup) / len(tgt.devices)
                    if program.flops else 0.0))
  if isinstance(compiled, Exception):
    oom = _oom(str(compiled))
    if oom:
      # The compiler refuses on its temporaries alone; the state (its
      # arguments) is held beside them.
      result.needed_bytes, result.hbm_bytes = oom[0] + state, oom[1]
    result.note = str(compiled).splitlines()[0]
    return result
  result.memory = memory(compiled)
  result.needed_bytes = result.memory["needed"]
  result.fits = result.needed_bytes <= tgt.hbm_bytes
  result.hlo = compiled.as_text()
  result.collectives = inspect.count_collectives(result.hlo)
  if estimate:
    _estimate(result, config, tgt, program,
              {} if probes is None else probes)
  return result


def memory(compiled) -> dict[str, int]:
  """The compiled program's bytes per device: its arguments, outputs
  (less those aliased to donated arguments), temporaries and code."""
  m = compiled.memory_analysis()
  needed = (m.argument_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes + m.temp_size_in_bytes)
  return {"arguments": m.argument_size_in_bytes,
          "outputs": m.output_size_in_bytes,
          "aliased": m.alias_size_in_bytes,
          "temporaries": m.temp_size_in_bytes,
          "code": m.generated_code_size_in_bytes, "needed": needed}


def _program_loops(hlo_text: str) -> list[str]:
  """The loops of a compiled program that jax wrote (a lax.scan or
  while_loop: op_name ".../while"), not those the TPU compiler makes of one
  op (a scatter of a few rows, whose small body is counted once)."""
  names = re.findall(r" while\(.*?op_name=\"([^\"]*)\"", hlo_text)
  return [n for n in names if n.rsplit("/", 1)[-1] == "while"]


def _probe(program: Program, probe, tgt: Target) -> tuple[float, float] | str:
  """(the compiler's seconds, its FLOPs) for one probe, or why there are
  none."""
  _, compiled, _ = program.compile(probe, tgt)
  if isinstance(compiled, Exception):
    return "no estimate: a probe did not compile"
  if _program_loops(compiled.as_text()):
    return ("no estimate: the step keeps a loop (ring attention's scan) "
            "whose body the compiler's cost model counts once")
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("optimal_seconds", -1.0)), float(cost["flops"])


def _estimate(result: Plan, config, tgt: Target, program: Program,
              probes: dict) -> None:
  """The compiler's step time from unrolled one- and two-layer probes
  (module docstring), and the MFU it implies."""
  if result.mesh["stage"] > 1:
    result.note = "no estimate: the pipeline's ticks are a loop"
    return
  accum = config.train.grad_accum_steps if program.microbatched else 1
  costs = []
  for layers in (1, 2):
    probe = copy.deepcopy(config)
    probe.model.update(n_layers=layers, scan_layers=False)
    probe.train.update(grad_accum_steps=1,
                       batch_size=config.train.batch_size // accum)
    probe, _ = validate(probe, tgt)
    key = (program.compile, tgt.name, probe.to_json())
    if key not in probes:
      probes[key] = _probe(program, probe, tgt)
    if isinstance(probes[key], str):
      result.note = probes[key]
      return
    if probes[key][0] <= 0:  # No need to compile the second probe.
      result.note = ("no estimate: the compiler's cost model gave none "
                     f"(optimal_seconds {probes[key][0]:.3g})")
      return
    costs.append(probes[key])
  (t1, f1), (t2, f2) = costs
  n = config.model.n_layers
  result.estimate_s = accum * (t1 + (n - 1) * (t2 - t1))
  result.xla_flops = accum * (f1 + (n - 1) * (f2 - f1))
  if result.model_flops:
    result.mfu = result.model_flops / result.estimate_s / tgt.peak_flops


def describe_mesh(sizes: dict[str, int]) -> str:
  used = {a: s for a, s in sizes.items() if s != 1} or {"data": 1}
  return " x ".join(f"{a}={s}" for a, s in used.items())


def row(p: Plan) -> str:
  """One line of a search table."""
  remat = next(o for o in p.overrides if ".remat=" in o).split("=")[1]
  accum = next(o for o in p.overrides if "grad_accum" in o).split("=")[1]
  est = (f"{p.estimate_s:.3g} s  MFU {p.mfu:.1%}" if p.estimate_s else
         "no estimate")
  fit = ("fits" if p.fits else
         f"needs {p.needed_bytes / GIB:.1f} GiB" if p.needed_bytes else
         "failed")
  return (f"{describe_mesh(p.mesh):<32} remat={remat:<13} accum={accum:<2} "
          f"{p.needed_bytes / GIB:7.2f} GiB  {fit:<18} {est:<24} "
          f"compile {p.compile_s:.0f} s")
