r"""Step time of each compression mode on a quiet machine: the tiny LM, 40
steps per mode, one mode at a time, median of the log lines after the first
(which includes compilation). Not the accuracy runs: those also trained
while other work shared the CPU.

python benchmarks/compression_speed.py [--steps=40]
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {
    "float32": [],
    "bfloat16": ["--config.precision.compute_dtype=bfloat16"],
    "float16": ["--config.precision.compute_dtype=float16"],
    "int8": ["--config.quant.mode=int8"],
    "int4_weights": ["--config.quant.mode=int4_weights"],
    "fp8": ["--config.quant.mode=fp8"],
    "int8 + int8 backward": ["--config.quant.mode=int8",
                             "--config.quant.backward=int8"],
    "prune 0.5": ["--config.prune.sparsity=0.5"],
}


def main(steps: int = 40) -> None:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  print("| mode | step ms (median) | vs float32 |\n|---|---|---|")
  base = None
  for name, flags in MODES.items():
    with tempfile.TemporaryDirectory() as workdir:
      subprocess.run(
          [sys.executable, "scripts/train.py", "--config=configs/lm.py:tiny",
           f"--workdir={workdir}", f"--config.train.steps={steps}",
           "--config.train.log_every=5", "--config.train.eval_every=0",
           "--config.train.checkpoint_every=0", *flags],
          cwd=ROOT, env=env, check=True, capture_output=True)
      lines = [json.loads(s) for s in open(f"{workdir}/metrics.jsonl")]
    tokens = 32 * 256  # Global batch x sequence length of the preset.
    rates = [x["tokens_per_sec"] for x in lines if x["split"] == "train"]
    ms = statistics.median(1000 * tokens / r for r in rates[1:])
    base = base or ms
    print(f"| {name} | {ms:.0f} | {ms / base:.2f}x |", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1].split("=")[1]) if len(sys.argv) > 1 else 40)
