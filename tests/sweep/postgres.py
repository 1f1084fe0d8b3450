"""A throwaway PostgreSQL server for the tests: the binaries the `pgserver`
wheel bundles (PostgreSQL 16.2, requirements-test.txt), one cluster in a
temporary folder, reached through a Unix socket only (no TCP port, no
network). Its Python API is not used: run as root it adds a system user
and opens up the permissions of every folder above the data; here the
server, which refuses to run as root, runs as `nobody` instead.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


def binaries() -> Path | None:
  """pgserver's bin folder (initdb, pg_ctl, postgres); None if the wheel
  or the driver of the URL (psycopg 3) is missing."""
  spec = importlib.util.find_spec("pgserver")
  if spec is None or importlib.util.find_spec("psycopg") is None:
    return None
  return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


@contextlib.contextmanager
def server():
  """Yields the database URL of a fresh server; stops it and deletes its
  files afterwards."""
  bin_dir = binaries()
  folder = Path(tempfile.mkdtemp(prefix="lm-pg-"))  # Short: a socket path.
  as_user = {}
  if os.geteuid() == 0:
    nobody = pwd.getpwnam("nobody")
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    as_user = dict(user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
    # A venv under a 0700 home (/root) is closed to `nobody`: its own copy
    # of the binaries and their libraries (34 MB), laid out as in
    # site-packages (the binaries find libpq at $ORIGIN/../../../).
    site = bin_dir.parents[2]
    shutil.copytree(bin_dir.parent, folder / "pgserver" / "pginstall",
                    symlinks=True, ignore=shutil.ignore_patterns("include"))
    shutil.copytree(site / "pgserver.libs", folder / "pgserver.libs")
    bin_dir = folder / "pgserver" / "pginstall" / "bin"
  data = folder / "data"

  def run(*args):
    result = subprocess.run([str(bin_dir / args[0]), *args[1:]], **as_user,
                            cwd=folder, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
  try:
    # No fsync: a test's database need not survive a power cut.
    run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust",
        "--encoding=UTF8", "--no-sync")
    run("pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
        f"-k {folder} -c listen_addresses='' -c fsync=off", "start")
    try:
      yield f"postgresql+psycopg://postgres@/postgres?host={folder}"
    finally:
      run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
  finally:
    shutil.rmtree(folder, ignore_errors=True)
