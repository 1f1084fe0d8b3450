r"""The presets of configs/*.py: model family, parameter count and mesh.

    python benchmarks/presets.py

Nothing is trained or allocated: each preset is resolved (lm.config.resolve)
and its model built abstractly (lm.models.abstract_model, under
nnx.eval_shape); the count is the exact number of elements of the model's
state, as training logs it (lm.train.state.count_params). The mesh is the
preset's as configured: the axes that are not 1 (-1 takes all remaining
devices). Writes benchmarks/results/presets.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import common

NAME = "presets"
# configs/lm.py's presets are the keys of its SIZES, read at run time.
SINGLE = ("mlp_digits", "mlp_mnist", "gan_digits", "gan_mnist",
          "classify_text")


def specs() -> list[str]:
  """Every preset, as --config names it."""
  from configs import lm as lm_presets  # noqa: PLC0415
  return ([f"configs/lm.py:{size}" for size in lm_presets.SIZES]
          + [f"configs/{name}.py" for name in SINGLE])


def describe(spec: str) -> dict:
  """Family, parameter count and mesh of one preset, e.g. configs/lm.py:tiny."""
  import importlib  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  import lm.config  # noqa: PLC0415
  import lm.models  # noqa: PLC0415
  import lm.parallel  # noqa: PLC0415
  import lm.train.state  # noqa: PLC0415
  path, _, arg = spec.partition(":")
  module = importlib.import_module(f"configs.{Path(path).stem}")
  config = lm.config.resolve(module.get_config(arg) if arg
                             else module.get_config())
  model = lm.models.abstract_model(lm.models.model_config(config),
                                   config.model.name)
  return {"config": spec, "family": config.model.name,
          "params": lm.train.state.count_params(nnx.state(model)),
          # [axis, size] pairs in the mesh's own axis order (the JSON's
          # dicts, like ConfigDict's items, are sorted by key).
          "mesh": [[axis, int(config.mesh[axis])]
                   for axis in lm.parallel.AXES]}


def count(n: int) -> str:
  """1.0M, 86k, 1.1B: the size at a glance (the JSON keeps the integer)."""
  for scale, unit in ((1e9, "B"), (1e6, "M")):
    if n >= scale:
      return f"{n / scale:.1f}{unit}"
  return f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def mesh(axes: list) -> str:
  shown = [f"{a}={n}" for a, n in axes if n != 1]
  return " x ".join(shown) or "one device"


def tables(results: dict) -> dict[str, str]:
  rows = [[f"`{p['config']}`", p["family"], count(p["params"]),
           f"{p['params']:,}", mesh(p["mesh"])] for p in results["presets"]]
  return {"table": common.markdown(
      ["config", "model family", "parameters", "exact", "mesh"], rows,
      "llrrl")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  data = {"presets": [describe(spec) for spec in specs()]}
  path = common.write(NAME, data, args.out)
  print(tables(json.loads(path.read_text()))["table"])
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
