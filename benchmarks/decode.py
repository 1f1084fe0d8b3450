r"""Decode speed against a peer: our KV-cache decoding and our server, and the
same weights in Hugging Face transformers on PyTorch (CPU).

    python scripts/benchmark_decode.py [--quick] [--rounds=N] [--out=PATH]

(`python benchmarks/decode.py` is the same program.) Needs the test
dependencies (requirements-test.txt: torch, transformers, openai).

Models: `tiny` (configs/lm.py:tiny) and `bench`-shaped (configs/lm.py:bench
with a SwiGLU MLP of width 683, the GELU 1024's FLOPs: transformers' Llama,
which our exports target, has no GELU MLP), both with the byte vocabulary
(256) and tied embeddings. Weights are random (seed 0; no training: speed
does not depend on them), with the end-of-text token's embedding row zeroed
so that greedy decoding never picks it and every request generates exactly
the tokens asked for, on both sides. Each is written as a real run directory
(config.json + an orbax checkpoint) per precision:
  float32   float32 parameters and compute;
  bfloat16  the float32 weights rounded to bfloat16, bfloat16 compute (the
            KV cache too), as transformers' bfloat16 model;
  int8      scripts/quantize.py of the float32 run: int8 weights and int8
            activations (dynamic per-token scales) in every attention and
            MLP projection; embedding and norms stay float32. transformers
            has no int8 CPU model to compare: its column reads n/a.

1. Prefill and decode, one process, interleaved. For each model, precision
   and batch B in (1, 8, 32): ours is lm/sample.py's `generate` (one
   prefill, then a lax.scan of decode steps), jitted, greedy; theirs is the
   run exported by lm/interop (scripts/export_hf.py) loaded into
   LlamaForCausalLM, `model.generate(do_sample=False)` with its default
   (dynamic) KV cache, torch.set_num_threads(the cores JAX uses). Both get
   the same prompts (token ids, never the end-of-text id). Each round times,
   on each side, a call generating 1 token and one generating N (a call
   under MIN_ROUND_S: the median of several); prefill tokens/s = B * P /
   t(1), decode tokens/s = B * (N - 1) / (t(N) - t(1)) (N - 1 decode steps
   follow the prefill); medians over the rounds; compile timed apart. A
   decode time the noise swamps (t(N) <= t(1)) fails the run (--quick:
   shown as "noise"). Each side must return B x N new tokens; the share of
   ours equal to theirs is recorded (float32: all, unless a near-tie of
   the random logits rounds the other way; bfloat16 drifts apart).
2. The server: scripts/serve.py on each run directory (a subprocess on
   loopback, --port=0; one server, started with the `server` settings,
   takes every concurrency level in turn), and a load generator here:
   `concurrency` clients (the openai client over asyncio), each sending
   its next request when the last one is answered, fixed prompts of P
   token ids, temperature 0, max_tokens N. Reports requests/s, output
   tokens/s and the p50 / p99 request latency (prefill + N tokens), after
   a warm-up request. The server and the clients share the machine's
   cores.

--quick: a smoke run of the script (shorter prompts and outputs, one
round, fewer requests): its figures are not the published ones.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common

NAME = "decode"
# configs/lm.py preset and model overrides.
MODELS = {"tiny": ("tiny", {}),
          "bench": ("bench", {"mlp": "swiglu", "d_ff": 683})}
PRECISIONS = ("float32", "bfloat16", "int8")
FULL = dict(batches=[1, 8, 32], concurrency=[1, 8, 32], prompt=128, new=128,
            rounds=5,
            # Requests per concurrency level (a few waves of the clients).
            requests={1: 6, 8: 24, 32: 64},
            server=dict(slots=32, prefill_chunk=128, prefill_batch=8))
QUICK = dict(batches=[1, 8], concurrency=[1, 8], prompt=32, new=32,
             rounds=1, requests={1: 2, 8: 8},
             server=dict(slots=8, prefill_chunk=32, prefill_batch=4))
# A round times each call at least MIN_ROUND_S (the median of up to
# MAX_REPEATS calls).
MIN_ROUND_S, MAX_REPEATS = 0.2, 5
EOS = 0  # The byte tokenizer's end-of-text id.
SEED = 0


def threads() -> int:
  """The cores JAX's CPU client uses (XLA sizes its pool by them)."""
  return len(os.sched_getaffinity(0))


def cpu_flags() -> dict:
  """lscpu's model name and the matrix-instruction flags that decide CPU
  bfloat16 / int8 speed (AVX512-BF16, AMX)."""
  out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  fields = dict(line.split(":", 1) for line in out.splitlines()
                if ":" in line)
  flags = set(fields.get("Flags", "").split())
  return {"lscpu_model_name": fields.get("Model name", "").strip(),
          **{f: f in flags for f in ("avx512_bf16", "amx_bf16", "amx_int8",
                                     "amx_tile", "avx512_vnni")}}


def _config(model: str, precision: str):
  from configs import lm as lm_configs  # noqa: PLC0415
  preset, overrides = MODELS[model]
  c = lm_configs.get_config(preset)
  c.model.update(overrides)
  c.precision.update(compute_dtype=precision, param_dtype=precision)
  c.mesh = dict(data=1, fsdp=1, tensor=1)
  return c


def _without_eos(params):
  """`params` with the end-of-text row of the tied embedding zeroed: its
  logit is then 0, below the largest of the others, so greedy decoding
  never ends a row early (the server would stop a request there)."""
  import jax  # noqa: PLC0415

  def is_embedding(path) -> bool:
    return jax.tree_util.keystr(path).endswith("['embedding']")
  found = [p for p, _ in jax.tree_util.tree_leaves_with_path(params)
           if is_embedding(p)]
  if len(found) != 1:
    raise RuntimeError(f"expected one (tied) embedding, found {found}")
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[EOS].set(0) if is_embedding(p) else x, params)


def write_runs(model: str, root: Path) -> dict[str, Path]:
  """{precision: run directory} for `model`: random float32 weights
  (end-of-text row zeroed), the same rounded to bfloat16, and the int8
  serving model scripts/quantize.py makes of the float32 run."""
  import jax  # noqa: PLC0415

  from lm.parallel import make_mesh, rules as rules_lib  # noqa: PLC0415
  from lm.run import checks, loop  # noqa: PLC0415
  from lm.train import checkpoint, state  # noqa: PLC0415

  runs, params = {}, None
  for precision in ("float32", "bfloat16"):
    config, _ = checks.validate(_config(model, precision), num_devices=1)
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    with rules_lib.use(rules_lib.Rules()), jax.set_mesh(mesh):
      setup = state.make_setup(config, mesh)
      init = setup.init_fn(jax.random.key(SEED))
      if params is None:
        params = _without_eos(init.params)
      cast = jax.tree.map(lambda x, y: x.astype(y.dtype), params,
                          init.params)
      runs[precision] = root / f"{model}_{precision}"
      ckpt = checkpoint.Checkpointer(runs[precision] / "checkpoints",
                                     async_save=False)
      ckpt.save(0, init.replace(params=cast), force=True)
      ckpt.close()
    loop.write_config(config, runs[precision])
  runs["int8"] = root / f"{model}_int8"
  common.run([sys.executable, "scripts/quantize.py",
              f"--workdir={runs['float32']}", f"--out={runs['int8']}",
              "--mesh=1,1,1"])
  return runs


def model_facts(model: str) -> dict:
  from lm import models  # noqa: PLC0415
  from lm.run import checks  # noqa: PLC0415
  config, _ = checks.validate(_config(model, "float32"), num_devices=1)
  cfg = models.model_config(config)
  keep = ("vocab_size", "max_len", "d_model", "n_layers", "n_heads",
          "n_kv_heads", "d_ff", "mlp", "tie_embeddings")
  return {k: getattr(cfg, k) for k in keep}


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


class Ours:
  """lm/sample.py generate on a run directory, greedy, jitted per shape."""

  def __init__(self, workdir: Path):
    import dataclasses  # noqa: PLC0415

    import jax  # noqa: PLC0415

    from lm.parallel import rules as rules_lib  # noqa: PLC0415
    from lm.run import restore  # noqa: PLC0415
    # As scripts/generate.py: a batch of prompts is replicated.
    self.rules = dataclasses.replace(rules_lib.Rules(), batch=None)
    with rules_lib.use(self.rules):
      self.loaded = restore.load(workdir, "1,1,1")
    self.key = jax.random.key(0)
    self.programs = {}

  @contextlib.contextmanager
  def context(self):
    import jax  # noqa: PLC0415

    from lm.parallel import rules as rules_lib  # noqa: PLC0415
    with rules_lib.use(self.rules), jax.set_mesh(self.loaded.setup.mesh):
      yield

  def compile(self, prompts, new: int) -> float:
    """Compiles generate for these prompts' shape and `new` tokens;
    seconds."""
    import functools  # noqa: PLC0415

    import jax  # noqa: PLC0415

    from lm import sample  # noqa: PLC0415
    fn = jax.jit(functools.partial(
        sample.generate, self.loaded.setup.graphdef, max_new_tokens=new,
        temperature=0.0))
    with self.context():
      seconds, self.programs[prompts.shape, new] = _timed(
          lambda: fn.lower(self.loaded.params, prompts, self.key).compile())
    return seconds

  def generate(self, prompts, new: int):
    """(seconds, B x new tokens)."""
    import jax  # noqa: PLC0415
    program = self.programs[prompts.shape, new]
    with self.context():
      return _timed(lambda: jax.device_get(
          program(self.loaded.params, prompts, self.key)))


class Theirs:
  """The run exported to Hugging Face format, in transformers, greedy."""

  def __init__(self, workdir: Path, out: Path, precision: str):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from lm.interop import hf_run  # noqa: PLC0415
    hf_run.export_run(str(workdir), str(out), dtype=precision, mesh="1,1,1")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    self.torch = torch
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=getattr(torch, precision)).eval()
    self.info = {"class": type(self.model).__name__,
                 "attention": self.model.config._attn_implementation}

  def generate(self, prompts, new: int):
    """(seconds, B x new tokens)."""
    import numpy as np  # noqa: PLC0415
    torch = self.torch
    ids = torch.from_numpy(np.asarray(prompts, np.int64))

    def run():
      with torch.inference_mode():
        return self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            max_new_tokens=new, do_sample=False, pad_token_id=EOS)
    seconds, out = _timed(run)
    return seconds, out[:, ids.shape[1]:].numpy()


def prompts_for(batch: int, length: int, seed: int = SEED):
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  return rng.integers(1, 256, (batch, length)).astype(np.int32)


def _repeats(seconds: float) -> int:
  """Calls per round for a call of `seconds`: a short call (milliseconds,
  where the machine's noise is as large) is the median of several."""
  return min(MAX_REPEATS, max(1, math.ceil(MIN_ROUND_S / seconds)))


def _rates(t1: list[float], tn: list[float], batch: int, prompt: int,
           new: int, repeats: list[int]) -> dict:
  """Tokens/s from each round's time for 1 and for `new` tokens (each
  the median of `repeats` calls)."""
  decode = [b - a for a, b in zip(t1, tn)]
  p, d, g = (statistics.median(x) for x in (t1, decode, tn))
  return {"prefill_s": p, "decode_s": d, "generate_s": g,
          "prefill_tokens_per_s": batch * prompt / p,
          # Noise larger than the decode time itself: no figure.
          "decode_tokens_per_s": batch * (new - 1) / d if d > 0 else None,
          "generate_tokens_per_s": batch * new / g,
          "calls_per_round": repeats,
          "rounds_1_token_s": t1, "rounds_n_tokens_s": tn}


def _check_shape(tokens, batch: int, new: int, who: str) -> None:
  if tokens.shape != (batch, new):
    raise RuntimeError(f"{who} returned {tokens.shape} tokens, not "
                       f"{(batch, new)}: unequal work, no comparison.")


def measure_decode(model: str, precision: str, runs: dict, tmp: Path,
                   s: dict, log) -> list[dict]:
  import numpy as np  # noqa: PLC0415
  P, N = s["prompt"], s["new"]
  ours = Ours(runs[precision])
  theirs = (Theirs(runs[precision], tmp / f"{model}_{precision}_hf",
                   precision) if precision != "int8" else None)
  rows = []
  for batch in s["batches"]:
    prompts = prompts_for(batch, P)
    compile_s = sum(ours.compile(prompts, n) for n in (1, N))
    sides = {"ours": ours, "transformers": theirs} if theirs else {
        "ours": ours}
    # Untimed first calls of each program (a compiled program's first run
    # is slow: allocation; transformers' first-call set-up); their times
    # set how many calls a round takes of each.
    repeats, tokens = {}, {}
    for who, side in sides.items():
      first = [side.generate(prompts, n) for n in (1, N)]
      tokens[who] = first[1][1]
      _check_shape(tokens[who], batch, N, who)
      repeats[who] = [_repeats(side.generate(prompts, n)[0]) for n in (1, N)]
    times = {who: ([], []) for who in sides}
    for _ in range(s["rounds"]):
      for who, side in sides.items():
        for n, reps, into in zip((1, N), repeats[who], times[who]):
          into.append(statistics.median(
              side.generate(prompts, n)[0] for _ in range(reps)))
    row = {"model": model, "precision": precision, "batch": batch,
           "compile_s": compile_s,
           **{who: _rates(*times[who], batch, P, N, repeats[who])
              for who in sides}}
    if theirs:
      row["transformers"] = _rates(*times["transformers"], batch, P, N, 1)
      row["transformers_info"] = theirs.info
      row["greedy_tokens_equal"] = float(np.mean(
          tokens["ours"] == tokens["transformers"]))
      row["ratio"] = {k: _ratio(row["ours"][k], row["transformers"][k])
                      for k in ("prefill_tokens_per_s", "decode_tokens_per_s",
                                "generate_tokens_per_s")}
    log(_decode_line(row))
    rows.append(row)
  return rows


def _ratio(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a / b


def _decode_line(row: dict) -> str:
  o, t = row["ours"], row.get("transformers")
  line = (f"{row['model']:5} {row['precision']:8} B={row['batch']:<2} ours "
          f"prefill {_k(o['prefill_tokens_per_s']):>7} decode "
          f"{_k(o['decode_tokens_per_s']):>7} tok/s")
  if t:
    line += (f" | transformers prefill {_k(t['prefill_tokens_per_s']):>7} "
             f"decode {_k(t['decode_tokens_per_s']):>7} tok/s | decode "
             f"{_x(row['ratio']['decode_tokens_per_s'])}, greedy tokens "
             f"equal {row['greedy_tokens_equal']:.2f}")
  return line


STARTUP = re.compile(r"^serving \S+ \(.*\) on http://127\.0\.0\.1:(\d+)/v1;")


class Server:
  """scripts/serve.py on a run, as a subprocess on a free loopback port."""

  def __init__(self, workdir: Path, name: str, settings: dict,
               timeout: float = 600):
    self.cmd = [sys.executable, "scripts/serve.py", f"--workdir={workdir}",
                "--port=0", "--mesh=1,1,1", f"--model_name={name}",
                *(f"--{k}={v}" for k, v in settings.items())]
    self.name, self.lines = name, []
    self.proc = subprocess.Popen(self.cmd, cwd=common.REPO, text=True,
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
    started = threading.Event()

    def read():  # Also keeps the pipe drained while the server runs.
      for line in self.proc.stdout:
        self.lines.append(line)
        m = STARTUP.match(line)
        if m:
          self.port, self.startup = int(m[1]), line.strip()
          started.set()
      started.set()
    self.reader = threading.Thread(target=read, daemon=True)
    self.reader.start()
    if not started.wait(timeout) or not hasattr(self, "port"):
      self.close()
      raise RuntimeError(f"{' '.join(self.cmd)} did not start:\n"
                         + "".join(self.lines)[-4000:])

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()  # SIGTERM: drains, then exits.
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.reader.join(10)


async def _load(port: int, name: str, prompts: list[list[int]],
                concurrency: int, requests: int, new: int) -> dict:
  import openai  # noqa: PLC0415
  client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                              api_key="unused", max_retries=0, timeout=600)

  async def one(i: int) -> tuple[float, int]:
    start = time.perf_counter()
    r = await client.completions.create(
        model=name, prompt=prompts[i % len(prompts)], max_tokens=new,
        temperature=0.0)
    seconds = time.perf_counter() - start
    if r.usage.completion_tokens != new:
      raise RuntimeError(f"request {i}: {r.usage.completion_tokens} tokens, "
                         f"not {new} (finish_reason "
                         f"{r.choices[0].finish_reason})")
    return seconds, r.usage.completion_tokens

  async with client:
    await one(0)  # Warm-up: the first connection and request path.
    todo = iter(range(requests))
    latencies, tokens = [], 0

    async def client_loop():
      nonlocal tokens
      for i in todo:
        seconds, n = await one(i)
        latencies.append(seconds)
        tokens += n
    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - start
  latencies.sort()
  return {"requests": requests, "seconds": wall,
          "requests_per_s": requests / wall,
          "output_tokens_per_s": tokens / wall,
          "p50_s": _percentile(latencies, 50),
          "p99_s": _percentile(latencies, 99), "latencies_s": latencies}


def _percentile(sorted_xs: list[float], q: float) -> float:
  """Linear interpolation between the closest ranks (numpy's default)."""
  k = (len(sorted_xs) - 1) * q / 100
  lo = int(k)
  hi = min(lo + 1, len(sorted_xs) - 1)
  return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def measure_server(model: str, precision: str, workdir: Path, s: dict,
                   log) -> list[dict]:
  prompts = [list(map(int, p)) for p in prompts_for(
      max(s["concurrency"]), s["prompt"], seed=SEED + 1)]
  name = f"{model}_{precision}"
  start = time.perf_counter()
  server = Server(workdir, name, s["server"])
  startup_s = time.perf_counter() - start
  rows = []
  try:
    for c in s["concurrency"]:
      row = {"model": model, "precision": precision, "concurrency": c,
             "startup_s": startup_s, "startup_line": server.startup,
             **asyncio.run(_load(server.port, name, prompts, c,
                                 s["requests"][c], s["new"]))}
      log(f"{model:5} {precision:8} server c={c:<2} "
          f"{row['requests_per_s']:6.2f} req/s "
          f"{row['output_tokens_per_s']:8.0f} tok/s p50 "
          f"{row['p50_s'] * 1e3:7.0f} ms p99 {row['p99_s'] * 1e3:7.0f} ms")
      rows.append(row)
  finally:
    server.close()
  # uvicorn re-raises the SIGTERM it drained on: -15 is a clean stop.
  if server.proc.returncode not in (0, -signal.SIGTERM):
    raise RuntimeError(f"the server exited {server.proc.returncode}:\n"
                       + "".join(server.lines)[-4000:])
  return rows


def _k(x: float | None) -> str:
  return "noise" if x is None else f"{x:,.0f}"


def _x(x: float | None) -> str:
  return "noise" if x is None else f"{x:.2f}x"


def tables(results: dict) -> dict[str, str]:
  s = results["settings"]
  models = "; ".join(
      f"{name}: d_model {m['d_model']}, {m['n_layers']} layers, "
      f"{m['n_heads']} heads ({m['n_kv_heads']} kv), {m['mlp']} "
      f"{m['d_ff']}, vocabulary {m['vocab_size']}"
      for name, m in s["models"].items())
  load = results["load_average_1min"]
  rounds = f"{s['rounds']} interleaved round" + "s" * (s["rounds"] > 1)
  head = (f"{models}. Batch x {s['prompt']}-token prompts, {s['new']} new "
          f"tokens, greedy; the median of {rounds}; {s['threads']} threads "
          f"each (torch {results['versions']['torch']}, transformers "
          f"{results['versions']['transformers']}); load average "
          f"{load['start']:.1f} at the start, {load['end']:.1f} at the end. "
          "Ratio: ours / transformers; int8: transformers has no CPU int8 "
          "model (n/a).\n\n")
  rows = []
  for r in results["decode"]:
    o, t = r["ours"], r.get("transformers")
    na = "n/a"
    rows.append([
        r["model"], r["precision"], r["batch"],
        _k(o["prefill_tokens_per_s"]),
        _k(t["prefill_tokens_per_s"]) if t else na,
        _x(r["ratio"]["prefill_tokens_per_s"]) if t else na,
        _k(o["decode_tokens_per_s"]),
        _k(t["decode_tokens_per_s"]) if t else na,
        _x(r["ratio"]["decode_tokens_per_s"]) if t else na])
  decode = head + common.markdown(
      ["model", "precision", "batch", "prefill tok/s, ours",
       "transformers", "ratio", "decode tok/s, ours", "transformers",
       "ratio"], rows, "llrrrrrrr")
  srv = s["server"]
  server_head = (
      f"scripts/serve.py --slots={srv['slots']} "
      f"--prefill_chunk={srv['prefill_chunk']} "
      f"--prefill_batch={srv['prefill_batch']}; each request: a "
      f"{s['prompt']}-token prompt, max_tokens={s['new']}, temperature 0; "
      "clients and server on the same cores.\n\n")
  server = server_head + common.markdown(
      ["model", "precision", "concurrency", "requests", "requests/s",
       "output tok/s", "p50 latency (ms)", "p99 latency (ms)"],
      [[r["model"], r["precision"], r["concurrency"], r["requests"],
        f"{r['requests_per_s']:.2f}", _k(r["output_tokens_per_s"]),
        _k(r["p50_s"] * 1e3), _k(r["p99_s"] * 1e3)]
       for r in results["server"]], "llrrrrrr")
  return {"decode": decode, "server": server}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_out_flag(parser, NAME)
  parser.add_argument("--quick", action="store_true",
                      help="A smoke run of the script (small shapes, one "
                      "round, few requests); not the published figures.")
  parser.add_argument("--rounds", type=int, default=0,
                      help="Interleaved timing rounds (0: the default).")
  parser.add_argument("--only", default="",
                      help="Models to run, comma-separated (default: all; "
                      "a check of the script, not the published table).")
  args = parser.parse_args(argv[1:])
  s = dict(QUICK if args.quick else FULL)
  if args.rounds:
    s["rounds"] = args.rounds
  only = common.parse_only(parser, args.only, MODELS) or list(MODELS)

  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  import openai  # noqa: PLC0415
  torch.set_num_threads(threads())
  s["threads"] = threads()
  started, load_before = time.perf_counter(), os.getloadavg()[0]
  if load_before > 0.5 * threads():
    print(f"warning: load average {load_before:.1f} on {threads()} cores: "
          "other work shares the CPU; the figures will be noisy (torch's "
          "OpenMP threads slow down many-fold when a core is taken).",
          flush=True)

  def log(line: str) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s] {line}", flush=True)

  decode, server, facts = [], [], {}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    for model in only:
      facts[model] = model_facts(model)
      runs = write_runs(model, tmp)
      log(f"{model}: run directories written")
      for precision in PRECISIONS:
        decode += measure_decode(model, precision, runs, tmp, s, log)
        server += measure_server(model, precision, runs[precision], s, log)
  noisy = [f"{r['model']} {r['precision']} batch {r['batch']} ({who})"
           for r in decode for who in ("ours", "transformers")
           if who in r and r[who]["decode_tokens_per_s"] is None]
  if noisy and not args.quick:
    raise RuntimeError("t(N tokens) - t(1 token) <= 0 (the machine's noise "
                       "exceeds the decode time) for " + ", ".join(noisy)
                       + "; rerun on a quieter machine (nothing written).")
  data = {"settings": {**s, "requests": {str(k): v for k, v in
                                         s["requests"].items()},
                       "models": facts, "weights": "random (seed 0), "
                       "end-of-text embedding row zeroed"},
          "cpu_flags": cpu_flags(),
          "versions": {"torch": torch.__version__,
                       "transformers": transformers.__version__,
                       "openai": openai.__version__},
          "seconds": time.perf_counter() - started,
          "load_average_1min": {"start": load_before,
                                "end": os.getloadavg()[0]},
          "decode": decode, "server": server}
  path = common.write(NAME, data, args.out, argv)
  for table in tables(data).values():
    print(table + "\n")
  print(f"wrote {path} in {data['seconds']:.0f} s")


if __name__ == "__main__":
  main(sys.argv)
