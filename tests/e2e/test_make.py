"""The README's test command fails when it collects no tests (pytest's exit
code 5 must not read as success)."""
import subprocess
import sys

from conftest import REPO


def test_make_test_fails_when_nothing_is_collected(tmp_path):
  empty = tmp_path / "no_tests_here"
  empty.mkdir()
  # This interpreter's venv, taken as installed (-o): its stamps are never
  # remade, whatever their age (`-o setup` alone reinstalled this package,
  # editable, from the checkout under test into the venv whenever
  # requirements*.txt or pyproject.toml were newer than the stamps: a git
  # worktree, a pull).
  venv = sys.prefix
  out = subprocess.run(["make", "-s", "-o", f"{venv}/.installed", "-o",
                        f"{venv}/.test-installed", "test", f"TESTS={empty}",
                        f"VENV={venv}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0, out.stdout + out.stderr
  assert "no tests ran" in out.stdout, out.stdout
