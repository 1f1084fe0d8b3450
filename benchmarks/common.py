"""What every benchmark shares: where results go, and what each records.

A benchmark is a script `benchmarks/NAME.py` that
- measures, then writes `benchmarks/results/NAME.json` with `write` (which
  adds the command that ran, the date, the machine and the versions); a run
  that fails raises, and writes nothing;
- defines `tables(results) -> {table name: markdown}`: the tables the docs
  show, rendered from that JSON alone (benchmarks/render_docs.py puts them
  between `<!-- table: NAME:TABLE -->` and `<!-- end table -->` markers).
Importing a benchmark must be cheap (no jax at module level): the renderer
and its test import every one.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def cpu() -> dict:
  """The CPU the figures come from: model, cores, and whether it has the
  AVX512-BF16 instructions (bfloat16 speed differs about 2x without)."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return {"model": model, "cores": os.cpu_count(),
          "avx512_bf16": "avx512_bf16" in flags,
          "amx_bf16": "amx_bf16" in flags}


def machine() -> dict:
  import importlib.metadata as md  # noqa: PLC0415
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
    try:
      versions[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  from lm import cpu as lm_cpu  # noqa: PLC0415
  # What malloc ran with (lm/cpu.py): huge pages change CPU step times.
  memory = {"transparent_huge_pages": lm_cpu.transparent_huge_pages(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
  return {"cpu": cpu(), "python": platform.python_version(), **versions,
          "memory": memory}


def command(argv: list[str] | None = None) -> str:
  """The command line that ran, relative to the repository."""
  argv = list(sys.argv if argv is None else argv)
  script = Path(argv[0]).resolve()
  try:
    argv[0] = str(script.relative_to(REPO))
  except ValueError:
    pass
  return shlex.join(["python", *argv])


def add_out_flag(parser, name: str) -> None:
  """--out: where the results go; benchmarks/results/NAME.json (what the
  docs render) unless a script is being tried out."""
  parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.json",
                      help="Results file (default: what the docs render).")


def provenance() -> dict:
  """The commit and date a measurement is made at."""
  # A copy of the tree measured elsewhere (a lent GPU machine's, whose .git
  # need not match the tree) is told its commit.
  commit = os.environ.get("LM_COMMIT", "")
  try:
    commit = commit or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
        capture_output=True, text=True).stdout.strip()
  except OSError:
    pass
  return {"commit": commit, "date": datetime.date.today().isoformat()}


def write(name: str, data: dict, out: Path | None = None,
          argv: list[str] | None = None) -> Path:
  """Writes `data` plus the command, date, machine and commit to `out`
  (default benchmarks/results/NAME.json). Returns the path."""
  record = {"command": command(argv), **provenance(), "machine": machine(),
            **data}
  path = Path(out or RESULTS / f"{name}.json")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
  tmp.replace(path)
  return path


def read(name: str) -> dict:
  return json.loads((RESULTS / f"{name}.json").read_text())


def parse_only(parser, value: str, choices) -> list[str]:
  """--only=a,b: the chosen names (empty: all), or a usage error naming
  the unknown ones."""
  only = [x for x in value.split(",") if x]
  unknown = sorted(set(only) - set(choices))
  if unknown:
    parser.error(f"--only: unknown {unknown}; choose from {list(choices)}")
  return only


def add_steps_flag(parser) -> None:
  """--steps=N: train every run N steps (few_steps), to check the script
  quickly; 0 (the default) trains what the configs say."""
  parser.add_argument("--steps", type=int, default=0,
                      help="Check of the script only: train every run this "
                      "many steps (no warmup; eval and checkpoint at the "
                      "end); 0 = the configs' steps.")


def few_steps(n: int, evals: int = 1) -> list[str]:
  """scripts/train.py overrides for a benchmark's --steps=N (a check of the
  script, not a measurement): N steps, no warmup (any N is a valid run),
  `evals` evals and a checkpoint at the end."""
  return [f"--config.train.steps={n}", "--config.optimizer.warmup_steps=0",
          f"--config.train.eval_every={max(n // evals, 1)}",
          f"--config.train.checkpoint_every={n}"]


def simulated_devices(n: int = 8) -> dict:
  """os.environ plus XLA_FLAGS for `n` simulated CPU devices: the
  environment of a child process that trains on a simulated mesh."""
  flags = (f"{os.environ.get('XLA_FLAGS', '')} "
           f"--xla_force_host_platform_device_count={n}")
  return dict(os.environ, XLA_FLAGS=flags.strip())


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
  """A subprocess that must succeed: on failure, raises with its output's
  tail (a benchmark never hides a failed run)."""
  kwargs.setdefault("cwd", REPO)
  out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
  if out.returncode:
    raise RuntimeError(f"{shlex.join(cmd)} exited {out.returncode}:\n"
                       + (out.stdout + out.stderr)[-4000:])
  return out


def eval_whole_validation(workdir: Path, env: dict | None = None) -> dict:
  """The run's latest checkpoint on every whole batch of the validation
  split (scripts/eval.py): {"batches", "bits_per_byte"}. A run's own evals
  read its first config.train.eval_batches batches, which hold more text
  with a BPE than with bytes; this is the same text for any tokenizer."""
  out = run([sys.executable, "scripts/eval.py", f"--workdir={workdir}",
             "--split=validation", "--batches=100000"], env=env).stdout
  match = re.search(r"validation \((\d+) batches\):.*bits_per_byte "
                    r"([\d.]+)", out)
  if not match:
    raise RuntimeError(f"no eval line in scripts/eval.py's output:\n{out}")
  return {"batches": int(match[1]), "bits_per_byte": float(match[2])}


def markdown(header: list[str], rows: list[list], align: str = "") -> str:
  """A markdown table; `align` holds one of l/r per column (default l)."""
  align = align or "l" * len(header)
  rule = ["---:" if a == "r" else "---" for a in align]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
