"""The docs publish only generated figures: every results table is rendered
from benchmarks/results/*.json by benchmarks/render_docs.py (and is up to
date with it), no hand-written table holds a measurement, and the README
stays short."""
import re

from benchmarks import common, render_docs

# What a measured figure looks like: a decimal, a percentage, a ratio, or a
# number with thousands separators.
FIGURE = re.compile(r"\d\.\d|\d\s?%|\b\d+(\.\d+)?x\b|\d,\d{3}")


def test_every_table_is_rendered_from_its_results():
  blocks = 0
  for path in render_docs.DOCS:
    text = path.read_text()
    for match in render_docs.BLOCK.finditer(text):
      blocks += 1
      want = render_docs.render_block(match["name"], match["table"])
      assert match["body"] == want, (
          f"{path.name}: table {match['name']}:{match['table']} is not what "
          "benchmarks/render_docs.py renders from its JSON; run it.")
  assert blocks >= 20


def test_no_hand_written_table_holds_a_figure():
  for path in render_docs.DOCS:
    text = render_docs.BLOCK.sub("", path.read_text())
    for line in text.splitlines():
      if line.startswith("|"):
        cells = re.sub(r"`[^`]*`", "", line)  # Commands may hold numbers.
        assert not FIGURE.search(cells), f"{path.name}: {line}"


def test_run_all_measures_every_published_results_file():
  """benchmarks/run_all.sh ("measures every figure the docs publish") runs
  the benchmark behind each results file, except gpu.py (needs a GPU) and
  a second machine's NAME--LABEL files."""
  script = (common.REPO / "benchmarks" / "run_all.sh").read_text()
  names = {p.name.split("--")[0].removesuffix(".json")
           for p in common.RESULTS.glob("*.json")} - {"gpu"}
  missing = sorted(n for n in names if not re.search(rf"\b{n}\b", script))
  assert not missing, f"benchmarks/run_all.sh does not run {missing}"
  assert len(names) >= 25


def test_the_renderer_names_the_command():
  results = {"command": "python benchmarks/x.py --steps=3", "date": "d",
             "commit": "c", "machine": {"cpu": {
                 "model": "m", "cores": 2, "avx512_bf16": False},
                 "jax": "j"}}
  line = render_docs.source_line(results)
  assert "`python benchmarks/x.py --steps=3`" in line
  assert "without AVX512-BF16" in line


def test_readme_is_short():
  assert len((common.REPO / "README.md").read_text().splitlines()) < 250
