r"""Every compression mode against its float32 baseline, on the same data and
steps, then the int8 serving models and the checks against the targets.

    python benchmarks/compression_modes.py [--workdir_root=runs/compression] \
        [--resume]

(--only=mlp, --steps=5 and --out=/tmp/x.json are for validating the script.)

Training runs (`scripts/train.py`, one at a time, 8 simulated CPU devices,
the configs' mesh data=8): the tiny LM on Shakespeare (configs/lm.py:tiny,
400 steps; its final eval is 8 fixed validation batches) and the MLP on
digits (configs/mlp_digits.py, 1,500 steps; the whole test split), each in
float32, bfloat16, float16 (loss scaling), fp8, int4_weights, int8 (QAT),
magnitude pruning to 0.5 and 0.8, a student with half the layers and width
alone, and that student distilled from the float32 run; the MLP also int8
with its class head quantized. Recorded per run: the final eval line of
metrics.jsonl and the float32 parameter bytes training holds.

Serving: `scripts/quantize.py` turns each int8 QAT run into a real int8
model, and each float32 run into one by post-training quantization (PTQ);
`scripts/eval.py` measures test loss (and accuracy) and parameter bytes of
those and of their sources. No step times: the runs may share the CPU with
other work (benchmarks/compression_speed.py measures speed on a quiet one).

Each run starts fresh in --workdir_root (an existing run directory of the
same name is deleted); with --resume a finished run started with the same
arguments (DIR/benchmark_args.json) is reused and an unfinished one
continues from its checkpoint.
A run that fails stops the script; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from benchmarks import common

NAME = "compression_modes"
CONFIGS = {"lm": "--config=configs/lm.py:tiny",
           "mlp": "--config=configs/mlp_digits.py"}
STUDENTS = {"lm": ["--config.model.d_model=64", "--config.model.n_layers=2",
                   "--config.model.d_ff=256"],
            "mlp": ["--config.model.width=128", "--config.model.depth=1"]}
# The MLP's default quantized layers leave the class head in float; this run
# quantizes it too (the serving size target needs it).
WITH_HEAD = ["--config.quant.mode=int8",
             r"--config.quant.layers=('hidden/\\d+', 'head')"]
# (serving model, its source run): QAT-converted and PTQ.
SERVING = {"lm": [("lm_int8_serving", "lm_int8"),
                  ("lm_ptq_serving", "lm_float32")],
           "mlp": [("mlp_int8_serving", "mlp_int8"),
                   ("mlp_int8_with_head_serving", "mlp_int8_with_head"),
                   ("mlp_ptq_serving", "mlp_float32")]}
# Measured on the test split by scripts/eval.py, in this order.
TESTED = {"lm": ["lm_float32", "lm_int8", "lm_int8_serving",
                 "lm_ptq_serving"],
          "mlp": ["mlp_float32", "mlp_int8", "mlp_int8_serving",
                  "mlp_int8_with_head", "mlp_int8_with_head_serving",
                  "mlp_ptq_serving"]}


def runs(family: str) -> list[tuple[str, str, list[str]]]:
  """(run name, mode shown in the table, train.py arguments) of a family's
  runs, float32 first; "$OUT" stands for --workdir_root."""
  student = STUDENTS[family]
  teacher = f"--config.distill.teacher_workdir=$OUT/{family}_float32"
  modes = [
      ("float32", "float32", []),
      ("bfloat16", "bfloat16", ["--config.precision.compute_dtype=bfloat16"]),
      ("float16", "float16", ["--config.precision.compute_dtype=float16"]),
      ("fp8", "fp8", ["--config.quant.mode=fp8"]),
      ("int4_weights", "int4_weights", ["--config.quant.mode=int4_weights"]),
      ("int8", "int8", ["--config.quant.mode=int8"]),
      *([("int8_with_head", "int8 with head", WITH_HEAD)]
        if family == "mlp" else []),
      ("prune50", "prune 0.5", ["--config.prune.sparsity=0.5"]),
      ("prune80", "prune 0.8", ["--config.prune.sparsity=0.8"]),
      ("student", "student", student),
      ("student_distilled", "student distilled", [*student, teacher]),
  ]
  return [(f"{family}_{name}", mode, [CONFIGS[family], *overrides])
          for name, mode, overrides in modes]



def _script(name: str, *args: str) -> str:
  """scripts/NAME.py on 8 simulated CPU devices, which must succeed; its
  stdout."""
  return common.run([sys.executable, f"scripts/{name}.py", *args],
                    env=common.simulated_devices()).stdout


def _lines(workdir: Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(s) for s in path.read_text().splitlines() if s]


def _final_eval(workdir: Path) -> dict | None:
  """The eval line at config.train.steps, or None if the run has none."""
  if not (workdir / "config.json").exists():
    return None
  steps = json.loads((workdir / "config.json").read_text())["train"]["steps"]
  evals = [x for x in _lines(workdir)
           if x["split"] == "eval" and x["step"] == steps]
  return evals[-1] if evals else None


def _train(workdir: Path, args: list[str], resume: bool) -> bool:
  """Trains (or, with `resume`, reuses or continues) the run; returns
  whether it was reused as it was."""
  record = workdir / "benchmark_args.json"
  if resume and workdir.exists():
    before = json.loads(record.read_text()) if record.exists() else None
    if before != args:
      raise RuntimeError(
          f"--resume: {workdir} was started with {before}, not {args}; "
          "remove it or run without --resume.")
    if _final_eval(workdir) is not None:
      return True
  elif workdir.exists():
    shutil.rmtree(workdir)  # Fresh runs: nothing of an earlier one is kept.
  workdir.mkdir(parents=True, exist_ok=True)
  record.write_text(json.dumps(args) + "\n")
  _script("train", f"--workdir={workdir}", *args)
  if _final_eval(workdir) is None:
    raise RuntimeError(f"{workdir}: train.py exited 0 without a final eval.")
  return False


def _serve(source: Path, out: Path, reuse: bool) -> None:
  if reuse and (out / "checkpoints").is_dir():
    return
  if out.exists():
    shutil.rmtree(out)  # quantize.py refuses a directory holding a model.
  _script("quantize", f"--workdir={source}", f"--out={out}")


_EVAL_LINE = re.compile(r"step (\d+) (.*?): (.*) \| params ([\d,]+) bytes "
                        r"\((.*)\)")


def _test(workdir: Path) -> dict:
  """scripts/eval.py's last line: metrics, params bytes and model kind."""
  out = _script("eval", f"--workdir={workdir}")
  match = _EVAL_LINE.fullmatch(out.strip().splitlines()[-1])
  if not match:
    raise RuntimeError(f"eval.py of {workdir}: unexpected output:\n{out}")
  step, split, values, size, kind = match.groups()
  metrics = {k: float(v) for k, v in (p.split(" ") for p in
                                      values.split(", "))}
  return dict(step=int(step), split=split, metrics=metrics,
              params_bytes=int(size.replace(",", "")), kind=kind)


def _params_bytes(workdir: Path) -> int:
  """Bytes of the parameters training holds (float32; QAT keeps float
  parameters), from the run's config."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from lm import config as config_lib, models  # noqa: PLC0415
  config = config_lib.resolve(json.loads((workdir / "config.json")
                                         .read_text()))
  config.quant.mode = "none"
  model = models.abstract_model(models.model_config(config),
                                config.model.name)
  return sum(x.size * x.dtype.itemsize
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def measure(family: str, root: Path, steps: int, resume: bool) -> dict:
  shorter = []  # --steps: validation of this script only.
  if steps:
    shorter = common.few_steps(steps)
  trained, reused = [], set()
  for name, mode, args in runs(family):
    args = [*args, *shorter]
    print(f"== {name}", flush=True)
    workdir = root / name
    if _train(workdir, [a.replace("$OUT", str(root)) for a in args], resume):
      reused.add(name)
    final = _final_eval(workdir)
    trained.append(dict(
        name=name, family=family, mode=mode, args=args, step=final["step"],
        eval={k: v for k, v in final.items() if k not in ("step", "split")},
        params_bytes=_params_bytes(workdir)))
  serving = []
  for name, source in SERVING[family]:
    print(f"== {name} (from {source})", flush=True)
    _serve(root / source, root / name, reuse=source in reused)
    serving.append(dict(name=name, source=source))
  tested = []
  for name in TESTED[family]:
    print(f"== test: {name}", flush=True)
    tested.append(dict(model=name, **_test(root / name)))
  return dict(runs=trained, serving=serving, test=tested)


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--workdir_root", default="runs/compression",
                      help="Scratch directory of the runs.")
  parser.add_argument("--resume", action="store_true",
                      help="Reuse finished runs (same arguments) and "
                      "continue unfinished ones, instead of starting every "
                      "run afresh.")
  parser.add_argument("--only", default="lm,mlp",
                      help="Comma-separated families to run.")
  common.add_steps_flag(parser)
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  only = args.only.split(",")
  if set(only) - set(CONFIGS):
    parser.error(f"--only={args.only}: the families are {sorted(CONFIGS)}.")
  root = Path(args.workdir_root).absolute()
  families = [f for f in CONFIGS if f in only]
  data = dict(families=families, workdir_root=args.workdir_root, runs=[],
              serving=[], test=[])
  for family in families:
    for key, rows in measure(family, root, args.steps, args.resume).items():
      data[key] += rows
  path = common.write(NAME, data, args.out)
  print(f"wrote {path}")


# Targets: the most a mode may cost against float32 (LM: relative eval loss;
# MLP: accuracy points), the least int8 serving must shrink the parameters,
# and how close a serving model's test loss must stay to its QAT source's.
MAX_LOSS_INCREASE = {"bfloat16": 0.01, "float16": 0.01, "int8": 0.01,
                     "int4_weights": 0.03}
MAX_ACCURACY_DROP = {"int8": 0.005}
MIN_SERVING_RATIO = 3.5
MAX_SERVING_DIFF = 0.005


def _by(rows: list[dict], key: str) -> dict[str, dict]:
  return {r[key]: r for r in rows}


def _training_table(results: dict, family: str) -> str:
  rows = [r for r in results["runs"] if r["family"] == family]
  base = rows[0]
  assert base["mode"] == "float32", base
  out = []
  for r in rows:
    if family == "lm":
      value, ref = r["eval"]["loss"], base["eval"]["loss"]
      delta = f"{100 * (value - ref) / ref:+.2f}%"
    else:
      value, ref = r["eval"]["accuracy"], base["eval"]["accuracy"]
      delta = f"{100 * (value - ref):+.2f} pts"
    mode = r["mode"]
    if "sparsity" in r["eval"]:
      mode += f" (sparsity {r['eval']['sparsity']:.2f})"
    command = " ".join(r["args"])
    out.append([mode, f"{value:.4f}", "baseline" if r is base else delta,
                f"{r['params_bytes']:,}", f"`{command}`"])
  what = "validation loss" if family == "lm" else "test accuracy"
  return common.markdown(
      ["mode", what, "vs float32", "params bytes (float32)", "command"], out,
      "lrrrl")


def _serving_table(results: dict) -> str:
  rows = []
  for r in results["test"]:
    m = r["metrics"]
    metric = f"{m['loss']:.4f}"
    if "accuracy" in m:
      metric += f" / {m['accuracy']:.4f}"
    rows.append([r["model"], r["kind"], metric, f"{r['params_bytes']:,}"])
  return common.markdown(
      ["model", "kind", "test loss (/ accuracy)", "params bytes"], rows,
      "llrr")


def _yes(met: bool) -> str:
  return "yes" if met else "**no**"


def _targets_table(results: dict) -> str:
  runs, test = _by(results["runs"], "name"), _by(results["test"], "model")
  rows = []
  if "lm" in results["families"]:
    base = runs["lm_float32"]["eval"]["loss"]
    for mode, limit in MAX_LOSS_INCREASE.items():
      rel = (runs[f"lm_{mode}"]["eval"]["loss"] - base) / base
      rows.append([f"LM {mode}: validation loss vs float32",
                   f"{100 * rel:+.2f}%", f"<= +{100 * limit:.0f}%",
                   _yes(rel <= limit)])
  if "mlp" in results["families"]:
    base = runs["mlp_float32"]["eval"]["accuracy"]
    for mode, limit in MAX_ACCURACY_DROP.items():
      diff = runs[f"mlp_{mode}"]["eval"]["accuracy"] - base
      rows.append([f"MLP {mode}: test accuracy vs float32",
                   f"{100 * diff:+.2f} pts", f">= -{100 * limit:.1f} pts",
                   _yes(diff >= -limit)])
  for family in results["families"]:
    for name, source in SERVING[family]:
      if "ptq" in name:
        continue
      ratio = test[source]["params_bytes"] / test[name]["params_bytes"]
      rows.append([f"{name}: params bytes, float32 / int8",
                   f"{ratio:.2f}x", f">= {MIN_SERVING_RATIO}x",
                   _yes(ratio >= MIN_SERVING_RATIO)])
      served, qat = (test[n]["metrics"]["loss"] for n in (name, source))
      rel = (served - qat) / qat
      rows.append([f"{name}: test loss vs its QAT run {source}",
                   f"{100 * rel:+.2f}%",
                   f"within {100 * MAX_SERVING_DIFF:.1f}%",
                   _yes(abs(rel) <= MAX_SERVING_DIFF)])
  for family in results["families"]:
    alone = runs[f"{family}_student"]["eval"]
    distilled = runs[f"{family}_student_distilled"]["eval"]
    if family == "lm":
      a, d = alone["loss"], distilled["loss"]
      rows.append(["LM student distilled vs alone: validation loss",
                   f"{d:.4f} vs {a:.4f}", "lower", _yes(d < a)])
    else:
      a, d = alone["accuracy"], distilled["accuracy"]
      rows.append(["MLP student distilled vs alone: test accuracy",
                   f"{d:.4f} vs {a:.4f}", "higher", _yes(d > a)])
  return common.markdown(["claim", "measured", "target", "met?"], rows,
                         "lrrl")


def tables(results: dict) -> dict[str, str]:
  out = {f: _training_table(results, f) for f in results["families"]}
  out["serving"] = _serving_table(results)
  out["targets"] = _targets_table(results)
  return out


if __name__ == "__main__":
  main()
