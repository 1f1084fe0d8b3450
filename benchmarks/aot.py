r"""Which LM preset fits which TPU slice, and how fast the TPU compiler says
it runs there: scripts/aot_compile.py for 1b, 8b and 70b on v5p and v6e
slices of several sizes (the searches behind the presets' defaults are
benchmarks/aot_search.py).

    python benchmarks/aot.py              (about an hour on a 2-core CPU;
                                           needs libtpu)
    python benchmarks/aot.py --quick      (1b on two small slices: a check)

Each plan compiles the preset's own config (its mesh, remat, batch) ahead of
time for the slice, one process per plan, and records what the compiler
answered, misses included: a plan that does not fit is a row, with what it
needs. Writes benchmarks/results/aot.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

NAME = "aot"
PRESETS = ("1b", "8b", "70b")
# Two generations: a small v5p slice, the slices the 8b/70b searches ran on
# (benchmarks/aot_search.py). Each plan is minutes of a 2-core CPU.
SLICES = ("v5p:2x2x4", "v5p:4x4x8", "v6e:16x16")
QUICK = (("1b",), ("v5e:2x2", "v6e:2x2"))
GIB = 2**30


def compile_plan(preset: str, topology: str, *extra: str) -> dict:
  """scripts/aot_compile.py's JSON for one preset on one slice, with the
  wall-clock seconds. Exit status 1 with a JSON (the step does not fit, or
  no searched plan does) is an answer; anything else failing raises."""
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "plan.json"
    cmd = [sys.executable, "scripts/aot_compile.py",
           f"--config=configs/lm.py:{preset}", f"--topology={topology}",
           f"--json={out}", *extra]
    start = time.monotonic()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    # Its report goes to our stdout as it comes (a search takes hours).
    result = subprocess.run(cmd, cwd=common.REPO, env=env, stdout=None,
                            stderr=subprocess.PIPE, text=True)
    seconds = time.monotonic() - start
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("error: ")]
    refused = result.returncode == 1 and len(errors) == 1
    if not (result.returncode == 0 or refused):
      raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n"
                         + result.stderr[-4000:])
    # Without a JSON, the config itself does not apply to the slice (e.g.
    # its batch does not split over the chips): that line is the answer.
    record = (json.loads(out.read_text()) if out.exists()
              else {"topology": topology})
  record.update(preset=preset, seconds=seconds,
                error=errors[0] if result.returncode else "")
  print(f"{preset} on {topology}: {seconds:.0f} s"
        + (f" -- {record['error']}" if record["error"] else ""), flush=True)
  return record


def mesh(plan: dict) -> str:
  used = [f"{a}={s}" for a, s in plan["mesh"].items() if s != 1]
  return " x ".join(sorted(used)) or "data=1"


def knob(plan: dict, key: str) -> str:
  return next(o.split("=")[1] for o in plan["overrides"] if key in o)


def gib(n: int) -> str:
  return f"{n / GIB:.1f}"


def fits(plan: dict) -> str:
  """yes; no; or no for a program the compiler did compile, whose
  arguments, outputs and temporaries still add up to more than the usable
  HBM (docs/planning.md: counted as not fitting)."""
  if plan["fits"]:
    return "yes"
  return "**no** (compiled)" if plan["memory"] else "**no**"


def estimate(plan: dict) -> tuple[str, str]:
  """(step seconds, MFU) as the tables show them: "—" for a plan that
  does not fit, "n/a" where the compiler gave no estimate."""
  if not plan["fits"]:
    return "—", "—"
  if plan["estimate_s"] is None:
    return "n/a", "n/a"
  return f"{plan['estimate_s']:.3g}", f"{plan['mfu']:.1%}"


def tables(results: dict) -> dict[str, str]:
  rows = []
  for r in results["plans"]:
    if "train" not in r:
      rows.append([f"`{r['preset']}`", f"`{r['topology']}`", "", "", "", "",
                   "", "config refused: " + r["error"].removeprefix(
                       "error: "), "", "", ""])
      continue
    train = r["train"]
    step, mfu = estimate(train)
    decode = r.get("decode")
    rows.append([
        f"`{r['preset']}`", f"`{r['topology']}`", r["chips"], mesh(train),
        knob(train, ".remat="), knob(train, "grad_accum"),
        f"{gib(train['needed_bytes'])} / {gib(train['hbm_bytes'])}",
        fits(train), step, mfu,
        gib(decode["needed_bytes"]) if decode else "—"])
  return {"fit": common.markdown(
      ["preset", "slice", "chips", "mesh", "remat", "microbatches",
       "train GiB per chip / usable", "fits", "step s (compiler)",
       "MFU (compiler)", "decode GiB per chip"], rows,
      # The wall time of each plan stays in the JSON: this machine was
      # shared (and paused) while it compiled, so it is no speed figure.
      "llrlllrlrrr")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_out_flag(parser, NAME)
  parser.add_argument("--quick", action="store_true",
                      help="1b on two small slices: a check of the script, "
                      "not the published table.")
  args = parser.parse_args()
  presets, slices = QUICK if args.quick else (PRESETS, SLICES)
  plans = [compile_plan(p, s) for p in presets for s in slices]
  path = common.write(NAME, {"plans": plans}, args.out)
  print(tables(json.loads(path.read_text()))["fit"])
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
