r"""Renders every results table of README.md and docs/*.md from
benchmarks/results/*.json, in place.

    python benchmarks/render_docs.py          # rewrite the tables
    python benchmarks/render_docs.py --check  # exit 1 if any is out of date

A table lives between `<!-- table: NAME:TABLE -->` and `<!-- end table -->`:
benchmarks/NAME.py's `tables(results)["TABLE"]`, from
benchmarks/results/NAME.json, under a line naming the command that measured
it, its date and the CPU. Nothing between the markers is written by hand.
A second machine's results go to `NAME--LABEL.json` (the benchmark's `--out`)
and render through NAME's `tables` under `<!-- table: NAME--LABEL:TABLE -->`.
"""
from __future__ import annotations

import importlib
import re
import sys

from benchmarks import common

DOCS = [common.REPO / "README.md", *sorted((common.REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w.-]+):(?P<table>[\w.-]+) -->\n)"
                   r"(?P<body>.*?)(<!-- end table -->)", re.S)


def source_line(results: dict) -> str:
  cpu = results["machine"]["cpu"]
  bf16 = f"{'with' if cpu['avx512_bf16'] else 'without'} AVX512-BF16"
  if "amx_bf16" in cpu:  # Recorded since the peer benchmark: AMX tiles.
    bf16 += " and AMX" if cpu["amx_bf16"] else ", without AMX"
  return (f"Measured by `{results['command']}` on {results['date']} "
          f"(commit {results['commit']}; {cpu['model']}, {cpu['cores']} "
          f"cores, {bf16}; jax {results['machine'].get('jax')}).")


def _script(name: str) -> str:
  """NAME--LABEL (a second machine's results) is measured by NAME.py."""
  return name.partition("--")[0]


def _command(name: str) -> str:
  out = f" --out=benchmarks/results/{name}.json" if "--" in name else ""
  return f"python benchmarks/{_script(name)}.py{out}"


def render_block(name: str, table: str) -> str:
  module = importlib.import_module(f"benchmarks.{_script(name)}")
  results = common.read(name)
  return f"{source_line(results)}\n\n{module.tables(results)[table]}\n"


def render(text: str, missing: set[str]) -> str:
  """`text` with every table whose results exist re-rendered; the names of
  those whose results do not are added to `missing` (their tables stay)."""
  def one(m: re.Match) -> str:
    if not (common.RESULTS / f"{m['name']}.json").exists():
      missing.add(m["name"])
      return m.group(0)
    return m.group(1) + render_block(m["name"], m["table"]) + m.group(5)
  return BLOCK.sub(one, text)


def main(argv: list[str]) -> int:
  stale, missing = [], set()
  for path in DOCS:
    text = path.read_text()
    new = render(text, missing)
    if new != text:
      stale.append(path)
      if "--check" not in argv:
        path.write_text(new)
  if "--check" in argv and stale:
    print("out of date (run python benchmarks/render_docs.py): "
          + ", ".join(str(p.relative_to(common.REPO)) for p in stale))
    return 1
  if missing:
    print("no results for " + ", ".join(sorted(missing)) + " (run "
          + " and ".join(_command(n) for n in sorted(missing))
          + "); their tables are unchanged")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
