"""Every script turns a user's mistake into one line on stderr and exit
status 1, without a traceback (lm/run/cli.py); --verbose adds it."""
import os
import subprocess
import sys

import pytest

from conftest import BASE_XLA_FLAGS, REPO, xla_flags
from lm.run import cli

TINY = "--config=configs/lm.py:tiny"


def _run(script: str, *args: str, env_add: dict | None = None):
  env = dict(os.environ, XLA_FLAGS=BASE_XLA_FLAGS)
  env.update(env_add or {})
  return subprocess.run([sys.executable, f"scripts/{script}.py", *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)


def _assert_one_line(result, *fragments: str) -> None:
  output = result.stdout + result.stderr
  assert result.returncode == 1, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


CASES = [
    ("train", [TINY.replace("tiny", "nope")],
     ["--config=configs/lm.py:nope", "configs/lm.py:nope is unknown",
      "'tiny'"]),
    ("train", ["--config=configs/missing.py"],
     ["configs/missing.py does not exist", "configs/lm.py, configs/mlp"]),
    ("train", [TINY, "--config.train.stpes=3"],
     ["--config.train.stpes=3", "no key 'stpes'", '"steps"']),
    ("train", [TINY, "--config.trian.steps=3"],
     ["--config.trian.steps=3", "no key 'trian'"]),
    ("train", [TINY, "--config.train.steps=abc"],
     ["--config.train.steps=abc", "invalid literal"]),
    ("train", [TINY], ["--workdir", "must have a value"]),
    ("train", [TINY, "--config.optimizer.learning_rate=-0.001"],
     ["config.optimizer.learning_rate=-0.001 must be a positive"]),
    ("train", [TINY, "--config.optimizer.learning_rate=nan"],
     ["config.optimizer.learning_rate=nan"]),
    ("eval", [], ["config.json does not exist", "--workdir"]),
    ("generate", ["--prompt=To be"], ["config.json does not exist"]),
    ("quantize", ["--out=OUT"], ["config.json does not exist"]),
    ("inspect_sharding", [TINY, "--config.mesh.data=3"],
     ["config.mesh", "8 devices"]),
    ("prepare_data", ["--config=configs/nothing.py"],
     ["configs/nothing.py does not exist"]),
    ("launch_local", ["--num_processes=0", "--", TINY],
     ["--num_processes and --devices_per_process must be >= 1"]),
    # The benchmark runs the training script's checks before it compiles.
    ("benchmark", ["--config=configs/lm.py:bench", "--input_batches=0",
                   "--config.model.attention_impl=cudnn"],
     ["config.model.attention_impl='cudnn' needs a gpu backend",
      "this one is cpu"]),
]


@pytest.mark.parametrize("script,args,fragments", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_mistake_is_one_line(script, args, fragments, tmp_path):
  args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
  if script in ("train", "eval", "generate", "quantize") and args != [TINY]:
    args.append(f"--workdir={tmp_path / 'run'}")
  env = ({"XLA_FLAGS": xla_flags()}
         if script == "inspect_sharding" else None)
  result = _run(script, *args, env_add=env)
  _assert_one_line(result, *fragments)


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  path = tmp_path / "file"
  path.write_text("notes")
  result = _run("train", TINY, f"--workdir={path}")
  _assert_one_line(result, f"the run directory {path} is a file")
  assert path.read_text() == "notes"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_verbose_shows_the_traceback(how, tmp_path):
  extra, env = (["--verbose"], None) if how == "flag" else (
      [], {"LM_VERBOSE": "1"})
  result = _run("train", TINY, "--config.optimizer.learning_rate=-1",
                f"--workdir={tmp_path}", *extra, env_add=env)
  assert result.returncode == 1
  assert "Traceback" in result.stderr
  assert "ConfigError: config.optimizer.learning_rate=-1" in result.stderr


def test_flag_error_line_keeps_the_flag_and_the_last_line():
  message = ("flag --config=configs/lm.py:nope: Error whilst parsing config "
             "file:\n\n  Traceback (most recent call last):\n    File x\n"
             "  ValueError: configs/lm.py:nope is unknown; use one of [...]")
  assert cli.flag_error_line(message) == (
      "--config=configs/lm.py:nope: configs/lm.py:nope is unknown; use one "
      "of [...]")
  assert cli.flag_error_line("flag --steps=x: bad") == "--steps=x: bad"


def test_orbax_leftover_task_logs_are_dropped_unless_verbose(monkeypatch):
  """asyncio's "Task exception was never retrieved" for an orbax read can
  come at any garbage collection, after the checkpoint is closed (it broke
  the one-line error of a damaged checkpoint, once, under load)."""
  import logging  # noqa: PLC0415

  def raised_in(filename: str) -> tuple:
    code = compile("def read():\n  raise ValueError('OUT_OF_RANGE')\n",
                   filename, "exec")
    namespace = {}
    exec(code, namespace)  # noqa: S102 - a frame with that file name.
    try:
      try:
        namespace["read"]()
      except ValueError as e:
        raise RuntimeError("Encountered error while reading") from e
    except RuntimeError as e:
      return (RuntimeError, e, e.__traceback__)

  def record(exc_info) -> logging.LogRecord:
    return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1,
                             "Task exception was never retrieved", (),
                             exc_info)

  leftover = cli._OrbaxLeftoverLogs()
  monkeypatch.delenv("LM_VERBOSE", raising=False)
  assert not leftover.filter(record(raised_in("/x/orbax/serialization.py")))
  assert leftover.filter(record(raised_in("/x/mine/loop.py")))
  monkeypatch.setenv("LM_VERBOSE", "1")
  assert leftover.filter(record(raised_in("/x/orbax/serialization.py")))
