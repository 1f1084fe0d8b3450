r"""The searches behind the 8b and 70b presets' defaults: scripts/aot_compile.py
--search for each on a v5p and a v6e slice, every plan as the TPU compiler
answered it.

    python benchmarks/aot_search.py       (hours on a 2-core CPU; needs libtpu)

Writes benchmarks/results/aot_search.json; docs/planning.md shows the best
plan of each search and how many were compiled, fit, or left out by the
budget.
"""
from __future__ import annotations

import argparse
import json

from benchmarks import aot, common

NAME = "aot_search"
SEARCHES = (("8b", "v5p:4x4x8"), ("8b", "v6e:16x16"), ("70b", "v5p:4x4x8"),
            ("70b", "v6e:16x16"))


def tables(results: dict) -> dict[str, str]:
  rows = []
  for r in results["searches"]:
    plans = r["search"]
    best = plans[0] if plans and plans[0]["fits"] else None
    step, mfu = aot.estimate(best) if best else ("—", "—")
    rows.append([
        f"`{r['preset']}`", f"`{r['topology']}`", len(plans),
        sum(p["fits"] for p in plans), r["not_compiled"],
        (f"{aot.mesh(best)}, remat {aot.knob(best, '.remat=')}, "
         f"microbatches {aot.knob(best, 'grad_accum')}" if best
         else "none fits"),
        f"{aot.gib(best['needed_bytes'])}" if best else "—", step, mfu,
        f"{r['seconds'] / 60:.0f}",
        # A record from before records had their own: the file's.
        f"{r.get('date', results['date'])}, "
        f"{r.get('commit', results['commit'])}"])
  best = common.markdown(
      ["preset", "slice", "plans compiled", "fit", "left out (budget)",
       "best plan", "GiB per chip", "step s (compiler)", "MFU (compiler)",
       "searched for (min)", "searched on"], rows, "llrrrlrrrrl")
  rows = []
  for r in results["searches"]:
    for i, p in enumerate(r["search"], 1):
      step, mfu = aot.estimate(p)
      rows.append([f"`{r['preset']}` on `{r['topology']}`", i, aot.mesh(p),
                   aot.knob(p, ".remat="), aot.knob(p, "grad_accum"),
                   aot.gib(p["needed_bytes"]),
                   aot.fits(p), step, mfu,
                   p["note"] if p["fits"] else ""])
  every = common.markdown(
      ["search", "rank", "mesh", "remat", "microbatches", "GiB per chip",
       "fits", "step s (compiler)", "MFU (compiler)", "note"], rows,
      "lrlllrlrrl")
  return {"best": best, "every": every}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_out_flag(parser, NAME)
  parser.add_argument("--search_compiles", type=int, default=10,
                      help="Most plans each search compiles.")
  parser.add_argument("--search_seconds", type=float, default=3600.0,
                      help="Most seconds each search compiles for.")
  names = [f"{p}@{s}" for p, s in SEARCHES]
  parser.add_argument("--only", default="", help="Comma-separated "
                      f"PRESET@SLICE of {names}: run these again and keep "
                      "the others' records from --out (each record names "
                      "its own commit and date).")
  args = parser.parse_args()
  only = common.parse_only(parser, args.only, names)
  kept = {}
  if only:
    old = json.loads(args.out.read_text())
    kept = {f"{r['preset']}@{r['topology']}": r for r in old["searches"]}
    for r in kept.values():  # Records of a run before records had these.
      r.setdefault("commit", old["commit"])
      r.setdefault("date", old["date"])
  found = []
  for name, (preset, topology) in zip(names, SEARCHES):
    if only and name not in only:
      found.append(kept[name])
      continue
    record = aot.compile_plan(
        preset, topology, "--search",
        f"--search_compiles={args.search_compiles}",
        f"--search_seconds={args.search_seconds}")
    found.append({**record, **common.provenance()})
  path = common.write(NAME, {"searches": found}, args.out)
  text = tables(json.loads(path.read_text()))
  print(text["best"] + "\n\n" + text["every"])
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
