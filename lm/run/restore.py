"""Loading a trained run back: its config, mesh and latest parameters (an
int8 serving run's too; a LoRA run's merged into plain ones), a
distillation teacher, and a LoRA run's frozen base.

Shared by the tools that read a workdir (generate, eval, quantize) and by the
loop (the teacher); the mesh can differ from the one that trained, since
checkpoints restore with resharding. Everything here uses the current
logical-axis rules table (lm.parallel.rules.current()).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import ml_collections

from lm import config as config_lib, paths
from lm.checks import UsageError
from lm.parallel import AXES, make_mesh, resolve_shape
from lm.quant import serving
from lm.run.metrics_log import log
from lm.train import checkpoint as ckpt_lib, distill, lora
from lm.train import state as state_lib

# In a LoRA run's directory: the base run its adapters were trained on,
# {"workdir": absolute path, "step": its checkpoint step}.
LORA_BASE = "lora_base.json"


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The run's config.json, resolved (a run written before a key existed
  gets that key's default)."""
  path = paths.resolve(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a run "
                            "directory written by scripts/train.py.")
  return config_lib.resolve(json.loads(path.read_text()))


def is_serving_dir(workdir: str | Path) -> bool:
  """Whether `workdir` holds an int8 serving model (scripts/quantize.py)."""
  path = paths.resolve(workdir) / "config.json"
  return path.exists() and "serving" in json.loads(path.read_text())


def parse_mesh(mesh_arg: str) -> dict[str, int]:
  """`--mesh`: "data,fsdp,tensor" sizes, or named axes such as
  "data=2,sequence=4" (unnamed axes are 1)."""
  parts = mesh_arg.split(",")
  try:
    if all("=" in p for p in parts):
      sizes = {k.strip(): int(v) for k, v in (p.split("=") for p in parts)}
    else:
      sizes = dict(zip(("data", "fsdp", "tensor"),
                       (int(p) for p in parts), strict=True))
  except ValueError:
    raise UsageError(f"--mesh={mesh_arg!r}: use three sizes "
                     "'data,fsdp,tensor' or named axes like "
                     "'data=2,sequence=4'.") from None
  unknown = sorted(set(sizes) - set(AXES))
  if unknown:
    raise UsageError(f"--mesh={mesh_arg!r}: unknown axis {unknown[0]!r}; "
                     f"mesh axes are {AXES}.")
  return sizes


def mesh_for(config, mesh_arg: str | None) -> dict[str, int]:
  """`--mesh` if given (see parse_mesh); the training mesh if it fits the
  devices here; otherwise FSDP over all devices."""
  if mesh_arg:
    return parse_mesh(mesh_arg)
  try:
    resolve_shape(config.mesh, jax.device_count())
    return dict(config.mesh)
  except ValueError:
    return dict(data=1, fsdp=-1, tensor=1)


@dataclasses.dataclass
class Loaded:
  config: ml_collections.ConfigDict
  setup: state_lib.Setup
  params: object
  step: int


def load(workdir: str | Path, mesh_arg: str | None = None) -> Loaded:
  """Restores the latest checkpoint of `workdir` onto a mesh of this host's
  devices. Call inside `jax.set_mesh(loaded.setup.mesh)` afterwards too."""
  config = load_config(workdir)
  with config.unlocked():
    config.mesh = mesh_for(config, mesh_arg)
  # An explicit mesh smaller than the host (e.g. --mesh=1,1,1 for an
  # unsharded reference) takes the first devices.
  sizes = list(config.mesh.values())
  mesh = make_mesh(config.mesh, None if -1 in sizes
                   else jax.devices()[:math.prod(sizes)])
  if lora.enabled(config):
    return _merged(workdir, config, mesh)
  serving_dir = is_serving_dir(workdir)
  setup = state_lib.make_setup(
      serving.float_config(config) if serving_dir else config, mesh)
  ckpt = ckpt_lib.Checkpointer(paths.resolve(workdir) / "checkpoints")
  # A reader: falls back past an unreadable checkpoint, but moves nothing.
  latest = functools.partial(ckpt.restore_latest, quarantine=False, warn=log)
  with jax.set_mesh(mesh):
    if serving_dir:
      # An int8 model from scripts/quantize.py: its own graph and parameter
      # tree (int8 kernels + scales), sharded like the float kernels.
      model = serving.setup_for(config, mesh)
      step, params = latest(serving.checkpoint_item(model.abstract_params))
      params = params["params"]
      setup = dataclasses.replace(
          setup, graphdef=model.graphdef,
          state_shardings=setup.state_shardings.replace(
              params=jax.tree.map(lambda x: x.sharding,
                                  model.abstract_params)))
    else:
      step, state = latest(setup.abstract_state)
      params = state.params
  ckpt.close()
  return Loaded(config=config, setup=setup, params=params, step=step)


def params_on(workdir: str | Path, mesh, mesh_sizes: dict,
              step: int | None = None
              ) -> tuple[int, state_lib.Setup, object]:
  """(step, the run's setup on `mesh`, its parameters at `step`, default
  the latest) of another run, sharded by its own logical names on this
  run's mesh."""
  config = load_config(workdir)
  with config.unlocked():
    config.mesh = dict(mesh_sizes)
  setup = state_lib.make_setup(config, mesh)
  ckpt = ckpt_lib.Checkpointer(paths.resolve(workdir) / "checkpoints")
  try:
    if step is None:
      step, state = ckpt.restore_latest(setup.abstract_state,
                                        quarantine=False, warn=log)
    else:
      state = ckpt.restore(setup.abstract_state, step=step)
  finally:
    ckpt.close()
  return step, setup, state.params


def lora_base(workdir: str | Path) -> dict | None:
  """What a LoRA run's lora_base.json records, or None without one."""
  path = paths.resolve(workdir) / LORA_BASE
  return json.loads(path.read_text()) if path.exists() else None


def write_lora_base(workdir: str | Path, base_workdir: str,
                    step: int) -> None:
  if jax.process_index() != 0:
    return
  path = paths.resolve(workdir) / LORA_BASE
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps({"workdir": str(paths.resolve(base_workdir)),
                             "step": step}, indent=2) + "\n")
  tmp.replace(path)  # Atomic: never a half-written file.


def latest_step_on_disk(workdir: str | Path) -> int | None:
  """The newest checkpoint step in a run's directory, without opening it
  (orbax's manager would create directories in a run we only read)."""
  directory = paths.resolve(workdir) / "checkpoints"
  steps = [int(p.name) for p in directory.iterdir()
           if p.name.isdigit()] if directory.is_dir() else []
  return max(steps, default=None)


def load_lora_base(config, setup: state_lib.Setup, step: int | None = None
                   ) -> tuple[int, object]:
  """(step, the frozen base of LoRA run `config` on `setup`'s mesh): the
  parameters of config.train.init_from at `step` (default its latest),
  quantized as config.lora.base_quant says, sharded by the rules table."""
  step, _, params = params_on(config.train.init_from, setup.mesh,
                              config.mesh, step)
  shardings = setup.frozen_shardings
  if config.lora.base_quant == "none":
    return step, jax.device_put(params, shardings)
  base = jax.jit(functools.partial(
      lora.base_from, graphdef=setup.graphdef,
      adapters_abstract=setup.abstract_state.params,
      base_abstract=setup.frozen_abstract, lora_cfg=config.lora),
                 out_shardings=shardings)(params)
  return step, base


def _merged(workdir, config, mesh) -> Loaded:
  """A LoRA run read as the plain run it amounts to: its latest adapters
  merged into the base they were trained on (lora_base.json), with the
  plain model's setup and config."""
  recorded = lora_base(workdir)
  if recorded is None:
    raise UsageError(f"{paths.resolve(workdir) / LORA_BASE} is missing: "
                     "this LoRA run never started training; train it first.")
  with config.unlocked():
    config.train.init_from = recorded["workdir"]
  plain = lora.plain_config(config)
  setup = state_lib.make_setup(config, mesh)
  plain_setup = state_lib.make_setup(plain, mesh)
  ckpt = ckpt_lib.Checkpointer(paths.resolve(workdir) / "checkpoints")
  with jax.set_mesh(mesh):
    try:
      step, state = ckpt.restore_latest(setup.abstract_state,
                                        quarantine=False, warn=log)
    finally:
      ckpt.close()
    _, base = load_lora_base(config, setup, recorded["step"])
    params = jax.jit(functools.partial(lora.merge, setup.graphdef,
                                       lora_cfg=config.lora),
                     out_shardings=plain_setup.param_shardings)(
                         state.params, base)
  return Loaded(config=plain, setup=plain_setup, params=params, step=step)


def load_teacher(config, mesh) -> distill.Teacher:
  """Restores the distillation teacher's latest parameters onto `mesh` (the
  student's), sharded by the teacher's own logical names."""
  step, setup, params = params_on(config.distill.teacher_workdir, mesh,
                                  config.mesh)
  return distill.Teacher(graphdef=setup.graphdef, params=params,
                         shardings=setup.param_shardings, step=step)
