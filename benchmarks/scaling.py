r"""Scaling study: step time and MFU of the bench model as d_model and the
sequence length grow, on this machine. Writes a JSON, a markdown table and a
PNG plot.

    python benchmarks/scaling.py [--out=runs/scaling] [--steps=8]

Width: d_model 128 -> 1024 (heads of 64, d_ff = 4 d_model), seq 256, batch
16. Length: seq 256 -> 4096 at d_model 256 with 4,096 tokens per step (batch
16 -> 1), so the projections' work stays fixed and only attention grows.
Each point is one `scripts/benchmark.py` run (its own process; medians of
the timed steps, compile excluded).
"""
import json
import os
import subprocess
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OUT = flags.DEFINE_string("out", os.path.join(REPO, "runs", "scaling"),
                           "Output directory.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps + 2 warm-up.")

WIDTHS = (128, 256, 512, 1024)
LENGTHS = (256, 512, 1024, 2048, 4096)
TOKENS = 4096


def point(name: str, d_model: int, seq: int, batch: int) -> dict:
  path = os.path.join(_OUT.value, f"{name}.json")
  if not os.path.exists(path):
    subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"),
         "--config=configs/lm.py:bench", f"--steps={_STEPS.value + 2}",
         "--rounds=1", "--input_batches=0", f"--out={path}",
         f"--config.model.d_model={d_model}",
         f"--config.model.n_heads={d_model // 64}",
         f"--config.model.n_kv_heads={d_model // 64}",
         f"--config.model.d_ff={4 * d_model}",
         f"--config.model.max_len={seq}", f"--config.train.batch_size={batch}"],
        cwd=REPO, check=True, capture_output=True)
  with open(path) as f:
    r = json.load(f)["rows"]["ours"]
  return dict(name=name, d_model=d_model, seq=seq, batch=batch,
              step_ms=r["step_ms_median"], mfu=r["mfu"],
              gflops_per_step=r["analytic_flops_per_step"] / 1e9)


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  width = [point(f"d{d}", d, 256, 16) for d in WIDTHS]
  length = [point(f"L{n}", 256, n, TOKENS // n) for n in LENGTHS]
  with open(os.path.join(_OUT.value, "scaling.json"), "w") as f:
    json.dump(dict(width=width, length=length), f, indent=1)

  print("| sweep | d_model | seq x batch | GFLOP/step | step (ms) | "
        "MFU (%) |\n|---|---:|---:|---:|---:|---:|")
  for sweep, rows in (("width", width), ("length", length)):
    for r in rows:
      print(f"| {sweep} | {r['d_model']} | {r['seq']} x {r['batch']} | "
            f"{r['gflops_per_step']:.1f} | {r['step_ms']:.0f} | "
            f"{100 * r['mfu']:.1f} |")

  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, rows, key, label in ((axes[0], width, "d_model",
                                "d_model (seq 256, batch 16)"),
                               (axes[1], length, "seq",
                                "sequence length (4,096 tokens/step)")):
    xs = [r[key] for r in rows]
    ax.plot(xs, [r["step_ms"] for r in rows], "o-", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("step time (ms)", color="tab:blue")
    twin = ax.twinx()
    twin.plot(xs, [100 * r["mfu"] for r in rows], "s--", color="tab:red")
    twin.set_ylabel("MFU (%)", color="tab:red")
    twin.set_ylim(0, 100)
  fig.suptitle("bench LM train step on this CPU (4 layers, float32)")
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, "scaling.png"), dpi=100)


if __name__ == "__main__":
  app.run(main)
