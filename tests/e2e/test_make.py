"""The README's test command fails when it collects no tests (pytest's exit
code 5 must not read as success)."""
import subprocess
import sys

from conftest import REPO


def test_make_test_fails_when_nothing_is_collected(tmp_path):
  empty = tmp_path / "no_tests_here"
  empty.mkdir()
  venv = sys.prefix  # This interpreter's venv: `setup` is not remade (-o).
  out = subprocess.run(["make", "-s", "-o", "setup", "test",
                        f"TESTS={empty}", f"VENV={venv}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0, out.stdout + out.stderr
  assert "no tests ran" in out.stdout, out.stdout
