r"""The README's compression tables from the runs of benchmarks/compression.sh.

python benchmarks/compression_table.py runs/compression

Each training run: its final eval (validation loss for the LM, test accuracy
for the MLP) against the float32 run of the same config, float32 parameter
bytes, median step time (train log lines after the first, which holds the
compile) and the command, rebuilt from the run's config.json as overrides of
the config file's defaults. Serving models: scripts/eval.py on the test split
(OUT/<run>/eval.txt).
"""
import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path


CONFIGS = {"lm": ("configs/lm.py", "tiny"), "mlp": ("configs/mlp_digits.py",
                                                    None)}
SKIP = {"data.data_dir"}  # Not part of the experiment.


def _lines(run: Path) -> list[dict]:
  return [json.loads(s) for s in (run / "metrics.jsonl").read_text().split(
      "\n") if s]


def _flat(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", tuple(v) if isinstance(v, list) else v


def _command(run: Path, family: str) -> str:
  path, preset = CONFIGS[family]
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base = dict(_flat((module.get_config(preset) if preset
                     else module.get_config()).to_dict()))
  ran = dict(_flat(json.loads((run / "config.json").read_text())))
  overrides = []
  for key, value in sorted(ran.items()):
    if key in SKIP or base.get(key) == value:
      continue
    if key == "distill.teacher_workdir":
      value = value.replace(str(run.parent) + "/", "$OUT/")
    overrides.append(f"--config.{key}={value}")
  name = f"{path}:{preset}" if preset else path
  return " ".join([f"--config={name}", *overrides])


def _bytes(run: Path) -> int:
  from lm import config as config_lib, models  # noqa: PLC0415
  import jax  # noqa: PLC0415
  config = config_lib.resolve(json.loads((run / "config.json").read_text()))
  config.quant.mode = "none"  # Training keeps float32 parameters.
  model = models.abstract_model(models.model_config(config),
                                config.model.name)
  from flax import nnx  # noqa: PLC0415
  return sum(x.size * x.dtype.itemsize
             for x in jax.tree.leaves(nnx.state(model)))


def _training_row(run: Path, family: str, baseline: float | None):
  lines = _lines(run)
  evals = [x for x in lines if x["split"] == "eval"]
  metric = "loss" if family == "lm" else "accuracy"
  value = evals[-1][metric]
  config = json.loads((run / "config.json").read_text())
  rate_key = "tokens_per_sec" if family == "lm" else "examples_per_sec"
  per_step = config["train"]["batch_size"] * (
      config["model"]["max_len"] if family == "lm" else 1)
  rates = [x[rate_key] for x in lines if x["split"] == "train"][1:]
  step_ms = 1000 * statistics.median(per_step / r for r in rates)
  sparsity = evals[-1].get("sparsity")
  if baseline is None:
    delta = "baseline"
  elif family == "lm":
    delta = f"{100 * (value - baseline) / baseline:+.2f}%"
  else:
    delta = f"{100 * (value - baseline):+.2f} pts"
  mode = run.name.split("_", 1)[1]
  if sparsity is not None:
    mode += f" (sparsity {sparsity:.2f})"
  return (f"| {mode} | {value:.4f} | {delta} | {_bytes(run):,} | "
          f"{step_ms:.0f} | `{_command(run, family)}` |")


def _eval_row(run: Path) -> str:
  text = (run / "eval.txt").read_text()
  loss = float(re.search(r"\bloss ([0-9.]+)", text).group(1))
  acc = re.search(r"\baccuracy ([0-9.]+)", text)
  size = int(re.search(r"params ([0-9,]+) bytes", text).group(1)
             .replace(",", ""))
  kind = re.search(r"bytes \((.*)\)", text).group(1)
  metric = f"{loss:.4f}" + (f" / {float(acc.group(1)):.4f}" if acc else "")
  return f"| {run.name} | {kind} | {metric} | {size:,} |"


def _finished(run: Path) -> bool:
  if not (run / "metrics.jsonl").exists():
    return False
  steps = json.loads((run / "config.json").read_text())["train"]["steps"]
  return any(x["split"] == "eval" and x["step"] == steps
             for x in _lines(run))


def main(out: str) -> None:
  out = Path(out)
  for family in ("lm", "mlp"):
    runs = sorted(p for p in out.glob(f"{family}_*") if _finished(p))
    base = out / f"{family}_float32"
    if not _finished(base):
      continue
    baseline = [x for x in _lines(base)
                                 if x["split"] == "eval"][-1][
                                     "loss" if family == "lm" else "accuracy"]
    what = ("validation loss" if family == "lm" else "test accuracy")
    print(f"\n| mode | {what} | vs float32 | params bytes (float32) | "
          "step ms | command |\n|---|---|---|---|---|---|")
    print(_training_row(base, family, None))
    for run in runs:
      if run != base:
        print(_training_row(run, family, baseline))
  print("\n| model | kind | test loss (/ accuracy) | params bytes |\n"
        "|---|---|---|---|")
  for run in sorted(out.glob("*")):
    if (run / "eval.txt").exists():
      print(_eval_row(run))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/compression")
