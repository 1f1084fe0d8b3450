r"""Plans a run for a TPU slice without one: compiles the real train step
(and the server's decode step) for the slice ahead of time and prints what
the compiler says: memory per chip against the chip's HBM, FLOPs, the
collectives by kind, its step-time estimate and the MFU it implies.

python scripts/aot_compile.py --config=configs/lm.py:8b --topology=v5p:4x4x8
python scripts/aot_compile.py --config=configs/lm.py:8b --topology=v6e:16x16 \
    --search

A step that does not fit ends with one line naming the shortfall and the
knobs, and exit status 1. --search compiles mesh / remat / microbatch
variants and ranks those that fit by the compiler's estimate. Needs libtpu
(pip install 'jax[tpu]==0.10.2'; requirements-test.txt has it). The local
backend is the CPU (JAX_PLATFORMS=cpu unless set): only the compiler is
the TPU's. See docs/planning.md.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Before jax is imported.

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm.checks import UsageError  # noqa: E402
from lm.run import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "The TPU slice, GENERATION:AxB[xC]: v5e:2x2, "
    "v6e:16x16, v5p:4x4x8 (v4, v5e, v5p, v6e).")
_DECODE = flags.DEFINE_boolean("decode", True, "Also plan the server's "
                               "decode step.")
_SLOTS = flags.DEFINE_integer("decode_slots", 8, "Requests decoded together "
                              "(scripts/serve.py --slots).")
_ESTIMATE = flags.DEFINE_boolean(
    "estimate", True, "Ask the compiler for a step-time estimate (two small "
    "probe compiles more per plan).")
_SEARCH = flags.DEFINE_boolean("search", False, "Compile mesh, remat and "
                               "microbatch variants; rank them.")
_AXES = flags.DEFINE_list("search_axes", ["data", "fsdp", "tensor", "stage",
                                          "sequence"],
                          "Mesh axes the search splits the chips over.")
_REMATS = flags.DEFINE_list("search_remat", ["full", "dots_no_batch",
                                             "offload", "dots", "none"],
                            "Remat policies the search tries, in order.")
_ACCUMS = flags.DEFINE_list("search_accum", ["1", "2", "4"],
                            "config.train.grad_accum_steps the search tries.")
_MAX = flags.DEFINE_integer("search_compiles", 24, "Most plans a search "
                            "compiles.")
_SECONDS = flags.DEFINE_float("search_seconds", 3600.0, "Most seconds a "
                              "search compiles for.")
_JSON = flags.DEFINE_string("json", None, "Also write the plans here.")
_HLO = flags.DEFINE_string("hlo", None, "Write the compiled train step's "
                           "HLO text here.")
flags.mark_flags_as_required(["config", "topology"])

GIB = 2**30


def _gib(n: int) -> str:
  return f"{n / GIB:.2f} GiB"


def _record(plan) -> dict:
  """A plan as JSON, without its HLO text."""
  import dataclasses  # noqa: PLC0415
  return {k: v for k, v in dataclasses.asdict(plan).items()
          if k not in ("hlo", "key")}


def _print_plan(what: str, p, tgt, extra: str = "") -> None:
  print(f"\n{what} (compiled in {p.compile_s:.1f} s){extra}")
  if not p.fits:
    print(f"  does not fit: {p.note or 'needs ' + _gib(p.needed_bytes)}")
    return
  m = p.memory
  print(f"  memory per chip   arguments {_gib(m['arguments'])}, temporaries "
        f"{_gib(m['temporaries'])}, outputs {_gib(m['outputs'])} "
        f"({_gib(m['aliased'])} of them in donated arguments): "
        f"{_gib(p.needed_bytes)} of {_gib(p.hbm_bytes)} "
        f"({p.needed_bytes / p.hbm_bytes:.0%})")
  print(f"  held per chip     {_gib(p.state_bytes)} (from the shapes and "
        "shardings)")
  if p.model_flops:
    xla = f", XLA {p.xla_flops:.3g}" if p.xla_flops else ""
    print(f"  FLOPs per chip    {p.model_flops:.3g} (model, analytic){xla}")
  print("  collectives       " + (", ".join(
      f"{k} {v}" for k, v in sorted(p.collectives.items())) or "none"))
  if p.estimate_s is None:
    print(f"  estimate          {p.note or 'none'}")
  else:
    mfu = f", MFU {p.mfu:.1%}" if p.mfu is not None else ""
    print(f"  estimate          {p.estimate_s:.4g} s per step (the "
          f"compiler's){mfu}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import json  # noqa: PLC0415

  from lm.run import aot, aot_search  # noqa: PLC0415
  from lm.serve import plan as serve_plan  # noqa: PLC0415

  accums = []
  for value in _ACCUMS.value:
    if not value.isdigit() or int(value) < 1:
      raise UsageError(f"--search_accum: {value!r} is not a positive "
                       "integer.")
    accums.append(int(value))
  for name in _AXES.value:
    if name not in aot_search.SEARCH_AXES:
      raise UsageError(f"--search_axes: {name!r} is not one of "
                       f"{list(aot_search.SEARCH_AXES)}.")
  tgt = aot.target(_TOPOLOGY.value)
  config = _CONFIG.value
  config, sizes = aot.validate(config, tgt)  # One line, before any compile.
  hosts = f", {tgt.processes} hosts" if tgt.processes > 1 else ""
  print(f"{tgt.name}: {tgt.chips} chips{hosts}, "
        f"{_gib(tgt.hbm_bytes)} HBM per chip usable (data sheet "
        f"{tgt.datasheet_hbm_gb} GB), "
        f"{tgt.peak_flops * len(tgt.devices) / tgt.chips / 1e12:.0f} "
        "TFLOP/s bfloat16 per chip")
  what = config_flags.get_config_filename(flags.FLAGS["config"])
  out = {"topology": tgt.name, "config": what, "chips": tgt.chips,
         "hbm_bytes": tgt.hbm_bytes, "peak_flops": tgt.peak_flops}

  def write():
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)

  if _SEARCH.value:
    plans, skipped = aot_search.search(
        config, tgt, axes=tuple(_AXES.value), remats=tuple(_REMATS.value),
        accums=tuple(accums), max_compiles=_MAX.value,
        max_seconds=_SECONDS.value)
    out["search"] = [_record(p) for p in plans]
    out["not_compiled"] = skipped
    write()
    print(f"\nranked ({len(plans)} compiled, {skipped} left out by the "
          "budget; by the compiler's estimate, fitting plans first):")
    for i, p in enumerate(plans, 1):
      print(f"{i:3d}. {aot.row(p)}")
    if not plans or not plans[0].fits:
      raise UsageError(f"no plan of {what} fits on {tgt.name}; try a larger "
                       "slice, or widen --search_axes / --search_accum.")
    print("\nbest: " + " ".join(plans[0].overrides))
    return
  train = aot.plan(config, tgt, estimate=_ESTIMATE.value)
  out["train"] = _record(train)
  if _HLO.value:
    with open(_HLO.value, "w") as f:
      f.write(train.hlo)
  print(f"config: {what} | mesh {aot.describe_mesh(sizes)} | remat "
        f"{config.model.remat} | grad_accum_steps "
        f"{config.train.grad_accum_steps} | batch {config.train.batch_size}")
  _print_plan("train step", train, tgt)
  if not train.fits:
    write()
    raise UsageError(train.shortfall_line(f"the train step of {what}"))
  if _DECODE.value and config.model.name == "transformer":
    length = config.model.max_len
    decode = aot.plan(config, tgt, serve_plan.program(_SLOTS.value, length),
                      estimate=False)
    # The cache write of each row (a scatter) is a loop in the TPU program,
    # and past one layer the compiler's cost model gives no time for it.
    decode.note = decode.note or ("none: the compiler's cost model gives "
                                  "none for the rows' cache writes")
    out["decode"] = _record(decode)
    extra = f", {_SLOTS.value} slots x {length} cache positions"
    _print_plan("decode step", decode, tgt, extra)
    if not decode.fits:
      write()
      raise UsageError(decode.shortfall_line(f"the decode step of {what}"))
  write()


if __name__ == "__main__":
  cli.run(main)
