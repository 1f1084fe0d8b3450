r"""The tiny Shakespeare LM fine-tuned on shakespeare_dialogue: full SFT,
LoRA and QLoRA against the base.

    python benchmarks/finetune.py [--base=RUN] [--steps=N]

Trains the base (configs/lm.py:tiny, 400 steps; or takes --base, a run of
that preset), then fine-tunes it with configs/sft.py:tiny three ways, each
on 8 simulated devices (the preset's mesh) for the preset's 150 steps:
full SFT, LoRA rank 8 on every attention and MLP projection, and QLoRA
(the same adapters on an int8 base). For the base and each fine-tune it
reports the trainable parameters, the bytes of the weights a step reads
(a LoRA run: the adapters and the frozen base), the optimizer state's
bytes, the median step time, the response-only loss on the SFT eval set
(the base: evaluated on it untrained) and the local lm-evaluation-harness
tasks' scores (scripts/eval_harness.py: next-line accuracy, rolling bits
per byte).
--steps shortens every run (a check of the script).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "finetune"
LORA = ["--config.lora.rank=8", "--config.lora.alpha=16",
        # Adapters start at zero update: a larger rate than full SFT's, as
        # LoRA recipes use.
        "--config.optimizer.learning_rate=3e-3"]
RUNS = {"full SFT": [], "LoRA r8": LORA,
        "QLoRA r8, int8 base": [*LORA, "--config.lora.base_quant=int8"]}


def _train(workdir: Path, config: str, steps: int, *extra: str) -> None:
  few = common.few_steps(steps) if steps else []
  common.run([sys.executable, "scripts/train.py", f"--config={config}",
              f"--workdir={workdir}", *few, *extra],
             env=common.simulated_devices(8))


def _harness(workdir: Path) -> dict:
  common.run([sys.executable, "scripts/eval_harness.py",
              f"--workdir={workdir}"], env=common.simulated_devices(8))
  results = json.loads((workdir / "eval_harness.json").read_text())
  return {"next_line_acc": results["shakespeare_next_line"]["acc,none"],
          "rolling_bits_per_byte":
              results["shakespeare_rolling"]["bits_per_byte,none"]}


def _state_sizes(workdir: Path) -> dict:
  """Trainable parameters and optimizer-state bytes of a run's train
  state, from its config (abstract shapes: nothing is allocated)."""
  import jax  # noqa: PLC0415

  from lm.parallel import make_mesh, rules as rules_lib  # noqa: PLC0415
  from lm.run import restore  # noqa: PLC0415
  from lm.train import state as state_lib  # noqa: PLC0415
  config = restore.load_config(workdir)
  config.mesh = dict(data=1, stage=1, fsdp=1, expert=1, sequence=1, tensor=1)
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh), rules_lib.use(rules_lib.Rules()):
    setup = state_lib.make_setup(config, mesh)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize  # noqa: E731
                            for x in jax.tree.leaves(tree))
  abstract = setup.abstract_state
  # The weights a step reads besides the trained ones: a LoRA run's frozen
  # base (int8 values and their scales under QLoRA).
  frozen = nbytes(setup.frozen_abstract) if setup.frozen_abstract else 0
  return {"trainable": state_lib.count_params(abstract.params),
          "param_bytes": nbytes(abstract.params) + frozen,
          "opt_state_bytes": nbytes(abstract.opt_state)}


def _metrics(workdir: Path) -> dict:
  lines = [json.loads(x) for x in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [x["step_time_s"] for x in lines
           if x["split"] == "train" and "step_time_s" in x]
  final = [x for x in lines if x["split"] == "eval"][-1]
  # The first logged interval holds the compile.
  return {"step_time_s": statistics.median(train[1:] or train),
          "response_loss": final["loss"]}


def _base_response_loss(base: Path, sft_workdir: Path) -> float:
  """The base, untrained on it, evaluated on the SFT eval set exactly as
  the fine-tunes' eval lines are."""
  import jax  # noqa: PLC0415

  from lm import tasks  # noqa: PLC0415
  from lm.parallel.mesh import batch_share  # noqa: PLC0415
  from lm.run import loop, restore  # noqa: PLC0415
  from lm.train import step as step_lib  # noqa: PLC0415
  loaded = restore.load(base)
  task = tasks.get(restore.load_config(sft_workdir))
  data = task.make_data(*batch_share(loaded.setup.mesh))
  with jax.set_mesh(loaded.setup.mesh):
    eval_step = step_lib.jit_eval_step(loaded.setup, task)
    return loop.evaluate(task, eval_step, loaded.params, data,
                         loaded.setup)["loss"]


def measure(tmp: Path, base: Path | None, steps: int) -> dict:
  if base is None:
    base = tmp / "base"
    _train(base, "configs/lm.py:tiny", steps)
  rows = []
  for name, extra in RUNS.items():
    workdir = tmp / name.split()[0].lower()
    _train(workdir, "configs/sft.py:tiny", steps,
           f"--config.train.init_from={base}", *extra)
    rows.append({"run": name, **_state_sizes(workdir), **_metrics(workdir),
                 **_harness(workdir)})
  rows.insert(0, {"run": "base (no fine-tuning)",
                  "response_loss": _base_response_loss(base, workdir),
                  **_harness(base)})
  return {"base": str(base), "runs": rows}


def tables(results: dict) -> dict[str, str]:
  def cell(row, key, fmt):
    return format(row[key], fmt) if key in row else "-"
  return {"runs": common.markdown(
      ["run", "trainable parameters", "weights", "optimizer state",
       "step time",
       "response loss (SFT eval)", "next-line accuracy",
       "rolling bits per byte"],
      [[r["run"], cell(r, "trainable", ","),
        (f"{r['param_bytes'] / 1e6:.2f} MB" if "param_bytes" in r else "-"),
        (f"{r['opt_state_bytes'] / 1e6:.2f} MB" if "opt_state_bytes" in r
         else "-"),
        (f"{r['step_time_s'] * 1e3:.0f} ms" if "step_time_s" in r else "-"),
        cell(r, "response_loss", ".3f"), cell(r, "next_line_acc", ".3f"),
        cell(r, "rolling_bits_per_byte", ".3f")]
       for r in results["runs"]], "lrrrrrrr")}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_out_flag(parser, NAME)
  common.add_steps_flag(parser)
  parser.add_argument("--base", type=Path, default=None,
                      help="A trained configs/lm.py:tiny run to fine-tune "
                      "(default: train one).")
  args = parser.parse_args(argv[1:])
  with tempfile.TemporaryDirectory() as tmp:
    data = measure(Path(tmp), args.base and args.base.resolve(), args.steps)
  common.write(NAME, data, args.out, argv)
  print(tables(data)["runs"])


if __name__ == "__main__":
  main(sys.argv)
