"""Every `python scripts/...` command in a code block of README.md and
docs/*.md runs as written, with a handful of steps.

Commands run in the order the page shows them, each page in one scratch
directory (`runs/` is rewritten to it), so a page's later commands can use
what its earlier ones trained. A training command gets a few steps and a
small batch appended (a sweep also two trials), and an LM config short
windows; a generating command a few tokens, and a harness evaluation a few
documents (the last value of a repeated flag wins); everything else runs
unchanged. The environment is the
test's with the caller's XLA_FLAGS, not the suite's 8 simulated devices: a
page that needs several devices says so with an `export XLA_FLAGS=...` line,
which applies to the commands after it.

Leading commands that several pages share (the same lines in the same
environment, from an empty `runs/`: the tiny LM that four pages train
first) run once per session, and their `runs/` is copied into each page's.
"""
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import BASE_XLA_FLAGS, REPO, made_once

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
# Appended to a generating command (generate.py, compare_hf.py --prompt: the
# greedy tokens' equality with transformers is tests/interop/test_hf.py's).
FEW_TOKENS = ["--max_new_tokens=16"]
# And to scripts/eval_harness.py: a few documents per task.
FEW_DOCUMENTS = ["--limit=5"]
# And to scripts/sweep.py (after FEW_STEPS): two trials, each with an eval
# after its first step (a sweep's objective is an eval metric).
FEW_TRIALS = ["--sweep.budget.trials=2", "--config.train.eval_every=1"]
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


def _children_cpu() -> float:
  """CPU seconds of the finished subprocesses (a shared machine's wall
  time says little)."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def shared_prefix(page: str) -> int:
  """How many leading commands `page` shares with another page."""
  mine, most = commands(page), 0
  for other in PAGES:
    if other != page:
      theirs, n = commands(other), 0
      while n < min(len(mine), len(theirs)) and mine[n] == theirs[n]:
        n += 1
      most = max(most, n)
  return most


def _run(page: str, env_add: dict, command: str, root, data_dir: str) -> None:
  """One command of `page`, with `runs/` in `root`."""
  argv = shlex.split(command.replace("runs/", f"{root}/runs/"))
  if argv[1] in ("scripts/train.py", "scripts/launch_local.py",
                 "scripts/sweep.py"):
    argv += FEW_STEPS
  if argv[1] == "scripts/sweep.py":
    argv += FEW_TRIALS
  if any(a.startswith(("--config=configs/lm.py", "--config=configs/sft.py"))
         for a in argv):
    argv += SHORT_WINDOWS
  if argv[1] in ("scripts/generate.py", "scripts/compare_hf.py"):
    argv += FEW_TOKENS
  if argv[1] == "scripts/eval_harness.py":
    argv += FEW_DOCUMENTS
  argv[0] = sys.executable
  # The page's own exports (e.g. XLA_FLAGS for 8 devices) win.
  env = {**os.environ, "XLA_FLAGS": BASE_XLA_FLAGS, "LM_DATA_DIR": data_dir,
         **env_add}
  start, cpu = time.monotonic(), _children_cpu()
  result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
  print(f"{time.monotonic() - start:6.1f} s ({_children_cpu() - cpu:5.1f} s "
        f"CPU)  {command}")
  assert result.returncode == 0, (
      f"{page}: {command}\n" + (result.stdout + result.stderr)[-4000:])


@pytest.mark.parametrize("page", PAGES)
def test_every_command_runs(page, data_dir, tmp_path, shared_tmp):
  todo, shared = commands(page), shared_prefix(page)
  if shared:
    key = hashlib.sha256(json.dumps(todo[:shared]).encode()).hexdigest()
    done = made_once(shared_tmp / f"docs_{key[:16]}", lambda root: [
        _run(page, env_add, command, root, data_dir)
        for env_add, command in todo[:shared]])
    print(f"the first {shared} commands: from {done} (shared with another "
          "page)")
    if (done / "runs").exists():
      shutil.copytree(done / "runs", tmp_path / "runs")
  for env_add, command in todo[shared:]:
    _run(page, env_add, command, tmp_path, data_dir)
