"""Every `python scripts/...` command in a code block of README.md and
docs/*.md runs as written, with a handful of steps.

Commands run in the order the page shows them, each page in one scratch
directory (`runs/` is rewritten to it), so a page's later commands can use
what its earlier ones trained. A training command gets a few steps and a
small batch appended, and an LM config short windows (the last value of a
repeated flag wins); everything else runs unchanged. The environment is the
test's with the caller's XLA_FLAGS, not the suite's 8 simulated devices: a
page that needs several devices says so with an `export XLA_FLAGS=...` line,
which applies to the commands after it.
"""
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from conftest import BASE_XLA_FLAGS, REPO

PAGES = ["README.md", *sorted(f"docs/{p}" for p in os.listdir(
    os.path.join(REPO, "docs")) if p.endswith(".md"))]
# Appended to every scripts/train.py command (also through launch_local's
# `--`): two steps on a small batch and no eval (scripts/eval.py commands
# evaluate); the run still ends with a checkpoint the next command can load.
FEW_STEPS = ["--config.train.steps=2", "--config.train.log_every=1",
             "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
             "--config.train.batch_size=8", "--config.optimizer.warmup_steps=0"]
# And for an LM or SFT config (train.py, launch_local.py,
# inspect_sharding.py):
# 64-token windows, which every preset's mesh divides (2 x sequence=8 = 16).
SHORT_WINDOWS = ["--config.data.seq_len=64"]
TIMEOUT = 600
# Servers run until stopped: tests/serve/test_server.py runs scripts/serve.py
# (and stops it with SIGTERM) instead.
SERVERS = ("scripts/serve.py",)


def commands(page: str) -> list[tuple[dict, str]]:
  """(environment additions, command) for each `python scripts/` line of
  the page's code blocks, continuation lines joined, comments dropped."""
  text = open(os.path.join(REPO, page)).read()
  out, env = [], {}
  for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
    block = block.replace("\\\n", " ")
    for line in block.splitlines():
      line = line.split("  #")[0].split(" # ")[0].strip()
      if line.startswith("export "):
        key, value = line[len("export "):].split("=", 1)
        env[key] = value
      elif (line.startswith("python scripts/")
            and line.split()[1] not in SERVERS):
        out.append((dict(env), line))
  return out


def test_the_pages_show_commands():
  """The extractor finds what the pages show (a broken one runs nothing)."""
  readme = [c for _, c in commands("README.md")]
  assert any(c.startswith("python scripts/train.py --config=configs/lm.py:tiny")
             for c in readme), readme
  assert any("generate.py" in c for c in readme)
  assert len(readme) >= 6


@pytest.mark.parametrize("page", PAGES)
def test_every_command_runs(page, data_dir, tmp_path):
  base = dict(os.environ, XLA_FLAGS=BASE_XLA_FLAGS)
  for env_add, command in commands(page):
    argv = shlex.split(command.replace("runs/", f"{tmp_path}/runs/"))
    if argv[1] in ("scripts/train.py", "scripts/launch_local.py"):
      argv += FEW_STEPS
    if any(a.startswith(("--config=configs/lm.py", "--config=configs/sft.py"))
           for a in argv):
      argv += SHORT_WINDOWS
    argv[0] = sys.executable
    env = dict(base, LM_DATA_DIR=data_dir, **env_add)
    start = time.monotonic()
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT)
    print(f"{time.monotonic() - start:6.1f} s  {command}")
    assert result.returncode == 0, (
        f"{page}: {command}\n" + (result.stdout + result.stderr)[-4000:])
