r"""Shows what a config's sharding costs before you launch it: the mesh,
each parameter's partition spec and bytes per device, the train state's
bytes per device, and the collectives in the compiled train step by kind.

XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python scripts/inspect_sharding.py --config=configs/lm.py:tiny \
  --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2

Nothing is allocated and no data is read: simulate as many CPU devices as
the target mesh has to inspect a pod config here.
"""
from absl import flags, logging
from ml_collections import config_flags

from lm.run import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].")
_PARAMS = flags.DEFINE_boolean("params", True, "Print the parameter table.")
flags.mark_flags_as_required(["config"])


def _mib(n: int) -> str:
  return f"{n / 2**20:,.2f} MiB"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import jax  # noqa: PLC0415

  from lm import tasks  # noqa: PLC0415
  from lm.parallel import inspect, make_mesh  # noqa: PLC0415
  from lm.parallel.mesh import describe  # noqa: PLC0415
  from lm.run import checks  # noqa: PLC0415
  from lm.train import state as state_lib, step as step_lib  # noqa: PLC0415

  config, _ = checks.validate(_CONFIG.value)
  mesh = make_mesh(config.mesh, dcn=config.mesh_dcn)
  print(f"mesh: {describe(mesh)} on {jax.device_count()} "
        f"{jax.devices()[0].platform} devices")
  with jax.set_mesh(mesh):
    setup = state_lib.make_setup(config, mesh)
    task = tasks.get(config)
    if _PARAMS.value:
      rows = inspect.parameter_table(setup.abstract_state.params)
      width = max(len(r["path"]) for r in rows)
      print(f"\n{'parameter':<{width}}  {'shape':<18} {'spec':<28} "
            f"{'bytes':>12} {'per device':>12}")
      for r in rows:
        spec = "(" + ", ".join(str(a) for a in r["spec"]) + ")"
        print(f"{r['path']:<{width}}  {str(r['shape']):<18} {spec:<28} "
              f"{r['bytes']:>12,} {r['device_bytes']:>12,}")
    for name, tree in (("parameters", setup.abstract_state.params),
                       ("optimizer state", setup.abstract_state.opt_state)):
      total, per_device = inspect.state_bytes(tree)
      print(f"{name}: {_mib(total)} in all, {_mib(per_device)} per device "
            f"({per_device / total if total else 0:.3f} of the total)")
    compiled = step_lib.compile_train_step(setup, task,
                                           config.train.grad_accum_steps)
  counts = inspect.count_collectives(compiled.as_text())
  print("collectives in the compiled train step: " + (", ".join(
      f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
  memory = compiled.memory_analysis()
  if memory is not None:
    print(f"compiled memory per device: arguments "
          f"{_mib(memory.argument_size_in_bytes)}, temporaries "
          f"{_mib(memory.temp_size_in_bytes)}, outputs "
          f"{_mib(memory.output_size_in_bytes)}")


if __name__ == "__main__":
  cli.run(main)
