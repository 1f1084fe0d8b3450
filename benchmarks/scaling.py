r"""Scaling study: step time and MFU of the bench model as d_model and the
sequence length grow, on this machine (one device, float32).

    python benchmarks/scaling.py [--steps=8] [--points=d128,L256]

Width: d_model 128 -> 1024 (heads of 64, d_ff = 4 d_model), seq 256, batch
16. Length: seq 256 -> 4096 at d_model 256 with 4,096 tokens per step (batch
16 -> 1), so the projections' work stays fixed and only attention grows.
Each point is one `scripts/benchmark.py` run (its own process, one after the
other; 1 round, 2 warm-up steps, then the median of `steps` + 1 timed ones;
compile excluded). Writes benchmarks/results/scaling.json and, from it, the
plot benchmarks/results/scaling.png (next to --out). A failed point fails
the whole run and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "scaling"
WIDTHS = (128, 256, 512, 1024)
LENGTHS = (256, 512, 1024, 2048, 4096)
TOKENS = 4096  # Per step in the length sweep.
WARMUP = 2  # scripts/benchmark.py's warm-up steps per round.


def points() -> list[dict]:
  """Every point of both sweeps: name, sweep, d_model, seq, batch."""
  width = [dict(name=f"d{d}", sweep="width", d_model=d, seq=256, batch=16)
           for d in WIDTHS]
  length = [dict(name=f"L{n}", sweep="length", d_model=256, seq=n,
                 batch=TOKENS // n) for n in LENGTHS]
  return width + length


def measure(p: dict, steps: int, tmp: Path) -> dict:
  """One scripts/benchmark.py run (its own process) at point `p`."""
  out, d = tmp / f"{p['name']}.json", p["d_model"]
  common.run([sys.executable, "scripts/benchmark.py",
              "--config=configs/lm.py:bench", f"--steps={steps + WARMUP}",
              "--rounds=1", "--input_batches=0", f"--out={out}",
              f"--config.model.d_model={d}",
              f"--config.model.n_heads={d // 64}",
              f"--config.model.n_kv_heads={d // 64}",
              f"--config.model.d_ff={4 * d}",
              f"--config.model.max_len={p['seq']}",
              f"--config.train.batch_size={p['batch']}"])
  run = json.loads(out.read_text())
  r = run["rows"]["ours"]
  return dict(p, step_ms=r["step_ms_median"], step_ms_all=run["ours_step_ms"],
              mfu=r["mfu"], flops_per_step=r["analytic_flops_per_step"],
              compile_s=r["compile_s"],
              matmul_peak_gflops=run["matmul_peak_gflops"])


def tables(results: dict) -> dict[str, str]:
  rows = [[p["sweep"], p["d_model"], f"{p['seq']} x {p['batch']}",
           f"{p['flops_per_step'] / 1e9:.1f}", f"{p['step_ms']:.0f}",
           f"{100 * p['mfu']:.1f}"] for p in results["points"]]
  return {"table": common.markdown(
      ["sweep", "d_model", "seq x batch", "GFLOP/step", "step (ms)",
       "MFU (%)"], rows, "lrrrrr")}


def plot(results: dict, path: Path) -> None:
  """Step time (log) and MFU against d_model and against the sequence
  length, from the results alone."""
  import matplotlib  # noqa: PLC0415  (slow: not at import)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, sweep, key, label in (
      (axes[0], "width", "d_model", "d_model (seq 256, batch 16)"),
      (axes[1], "length", "seq", "sequence length (4,096 tokens/step)")):
    rows = [p for p in results["points"] if p["sweep"] == sweep]
    xs = [p[key] for p in rows]
    ax.plot(xs, [p["step_ms"] for p in rows], "o-", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("step time (ms)", color="tab:blue")
    twin = ax.twinx()
    twin.plot(xs, [100 * p["mfu"] for p in rows], "s--", color="tab:red")
    twin.set_ylabel("MFU (%)", color="tab:red")
    twin.set_ylim(0, 100)
  fig.suptitle("bench LM train step on this CPU (4 layers, float32)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=8,
                      help="Timed steps per point (+ 1), after 2 warm-up "
                      "steps.")
  parser.add_argument("--points", default="",
                      help="Comma-separated points to run, e.g. d128,L256 "
                      "(default: all).")
  common.add_out_flag(parser, NAME)  # The plot goes next to it (.png).
  args = parser.parse_args()
  known = [p["name"] for p in points()]
  names = [n for n in args.points.split(",") if n] or known
  if set(names) - set(known):
    parser.error(f"unknown points {sorted(set(names) - set(known))}; "
                 f"known: {known}")
  with tempfile.TemporaryDirectory() as tmp:
    measured = []
    for p in points():
      if p["name"] in names:
        measured.append(measure(p, args.steps, Path(tmp)))
        print(f"{p['name']}: {measured[-1]['step_ms']:.0f} ms", flush=True)
  data = {"steps": args.steps, "points": measured}
  path = common.write(NAME, data, args.out)
  results = json.loads(path.read_text())
  plot(results, path.with_suffix(".png"))
  print(tables(results)["table"])
  print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
  main()
