r"""Benchmarks our train step against the reference (../shared/bench/ref_lm.py).

python scripts/benchmark.py --config=configs/lm.py:bench --compare_ref \
    [--steps=20 --rounds=3 --out=bench.json --config.precision.compute_dtype=bfloat16]

Like with like (see DESIGN.md): the reference gets our shapes on its command
line, both report tokens/s and MFU from the same analytic FLOPs (cross-checked
with XLA's cost analysis), and the two run interleaved in one session because
the machine is shared and noisy: each round runs the reference subprocess
(this process idles meanwhile), then times our step.
"""
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import flags, logging
from ml_collections import config_flags

from lm.checks import UsageError
from lm.run import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per round, each side.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
_COMPARE = flags.DEFINE_bool(
    "compare_ref", False, "Also run the reference at the same shapes, "
    "interleaved with our rounds, and print the ratio.")
_REF = flags.DEFINE_string("ref", "../shared/bench/ref_lm.py",
                           "Reference script (relative: to cwd, else repo root).")
_REF_ATTN = flags.DEFINE_string("ref_attn", "naive",
                                "Reference attention: naive | xla.")
_OUT = flags.DEFINE_string("out", None, "Also write all numbers here as JSON.")
_INPUT_BATCHES = flags.DEFINE_integer(
    "input_batches", 300, "Batches read from the real input pipeline to time "
    "it on its own (0: skip).")
flags.mark_flags_as_required(["config"])

WARMUP_STEPS = 2  # Per round, as the reference does: excluded from medians.


def time_input_pipeline(config, batches: int) -> dict:
  """Tokens/s of the training iterator alone (the real corpus, this
  process's pipeline: windows, shuffle, batching, host arrays)."""
  import lm.tasks  # noqa: PLC0415
  data = lm.tasks.get(config).make_data()
  next(data.train)  # Start-up (worker threads, first reads) not timed.
  t = time.perf_counter()
  tokens = sum(next(data.train)["tokens"][:, 1:].size for _ in range(batches))
  return {"tokens_per_s": tokens / (time.perf_counter() - t),
          "batches": batches}


def run_reference(path: str, model_cfg, seq_len: int, batch: int, steps: int,
                  attn: str) -> dict:
  """One reference run with our shapes; its last stdout line is JSON."""
  cmd = [sys.executable, path, "--dtype", model_cfg.dtype, "--steps",
         str(steps), "--attn", attn, "--layers", str(model_cfg.n_layers),
         "--d", str(model_cfg.d_model), "--heads", str(model_cfg.n_heads),
         "--ff", str(model_cfg.d_ff), "--vocab", str(model_cfg.vocab_size),
         "--seq", str(seq_len), "--batch", str(batch)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1])


def _xla_peak_bytes(compiled) -> float:
  """Arguments + outputs + temporaries, less donated (aliased) buffers."""
  mem = compiled.memory_analysis()
  if mem is None:
    return float("nan")
  get = lambda name: getattr(mem, name, 0) or 0
  return float(get("temp_size_in_bytes") + get("argument_size_in_bytes") +
               get("output_size_in_bytes") - get("alias_size_in_bytes"))


def _ref_path(path: str) -> str:
  if os.path.isabs(path) or os.path.exists(path):
    return os.path.abspath(path)
  return os.path.join(ROOT, path)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import dataclasses  # noqa: PLC0415
  import math  # noqa: PLC0415
  import jax  # noqa: PLC0415  (after flags: jax reads XLA_FLAGS on import)
  import numpy as np  # noqa: PLC0415
  import lm.parallel  # noqa: PLC0415
  import lm.train.state  # noqa: PLC0415
  import lm.tasks  # noqa: PLC0415
  import lm.train.step  # noqa: PLC0415
  from lm import cpu  # noqa: PLC0415
  from lm.data import pipeline  # noqa: PLC0415
  from lm.models import transformer  # noqa: PLC0415
  from lm.run import checks, perf  # noqa: PLC0415

  # The training script's checks, before anything compiles: a choice this
  # backend cannot run (attention_impl=cudnn on a CPU) is one line.
  config, _ = checks.validate(_CONFIG.value)
  steps, ref = _STEPS.value, _ref_path(_REF.value)
  if steps <= WARMUP_STEPS:
    raise UsageError(f"--steps must exceed the {WARMUP_STEPS} warm-up steps.")
  # Measured once in a subprocess and cached: no big matrices in this
  # process's memory (its peak RSS is one of the measured numbers).
  peak, peak_source = perf.peak_flops(config.precision.compute_dtype,
                                      jax.devices()[:1], remeasure=True)
  peak_gflops = peak / 1e9

  # A fully explicit mesh (bench: 1x1x1) takes the first devices, so the
  # benchmark also runs where XLA_FLAGS simulates several CPU devices.
  sizes = [int(config.mesh[a]) for a in lm.parallel.AXES]
  devices = None if -1 in sizes else jax.devices()[:math.prod(sizes)]
  mesh = lm.parallel.make_mesh(config.mesh, devices)
  seq_len, batch_size = pipeline.seq_len(config), config.train.batch_size
  rng = np.random.default_rng(0)

  with jax.set_mesh(mesh):
    setup = lm.train.state.make_setup(config, mesh)
    model_cfg = setup.model_cfg
    vocab = model_cfg.vocab_size

    def make_batch() -> dict:
      # Token 0 never appears, as in the reference (it masks 0 targets).
      tokens_BxL1 = rng.integers(1, vocab, (batch_size, seq_len + 1), np.int32)
      return {"tokens": jax.device_put(tokens_BxL1, setup.batch_sharding())}

    state = setup.init_fn(jax.random.key(config.seed))
    fn = lm.train.step.jit_train_step(setup, lm.tasks.get(config),
                                      config.train.grad_accum_steps)
    batch = make_batch()
    t = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t

    ours_ms, ref_runs = [], []
    for _ in range(_ROUNDS.value):
      if _COMPARE.value:
        ref_runs.append(run_reference(ref, model_cfg, seq_len, batch_size,
                                      steps, _REF_ATTN.value))
      # steps + 1 as the reference runs, so both keep steps - 1 per round.
      for i in range(steps + 1):
        batch = jax.block_until_ready(make_batch())  # Input prep not timed.
        t = time.perf_counter()
        # The state is donated: always continue from the returned one.
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= WARMUP_STEPS:
          ours_ms.append((time.perf_counter() - t) * 1e3)
    final_loss = float(metrics["loss"])

  # The reference's own medians skip its first 2 steps; pool its steady steps
  # across rounds so both sides' medians are over all rounds alike.
  ref_ms = [t for r in ref_runs for t in r["times_ms"][WARMUP_STEPS:]]
  tokens = batch_size * seq_len
  # Reference shapes: MHA with a GELU MLP; equal to ours for the bench preset.
  ref_cfg = dataclasses.replace(model_cfg, mlp="gelu",
                                n_kv_heads=model_cfg.n_heads, head_dim=0)
  rows = {}
  sides = [("ours", ours_ms, model_cfg, compile_s, perf.xla_flops(compiled),
            _xla_peak_bytes(compiled) / 2**20,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)]
  if ref_runs:
    sides.append(("reference (ref_lm.py)", ref_ms, ref_cfg,
                  statistics.median(r["aot_compile_s"] for r in ref_runs),
                  ref_runs[0]["xla_cost_flops"], float("nan"),
                  # Not its own: Linux carries this process's high-water RSS
                  # into a child across fork/exec, so ref_lm.py's ru_maxrss
                  # reads at least ours.
                  float("nan")))
  for name, ms, cfg, compile_, xla_flops, xla_mem, rss in sides:
    step_s = statistics.median(ms) / 1e3
    flops = transformer.flops_per_token(cfg, seq_len) * tokens
    rows[name] = dict(
        step_ms_median=step_s * 1e3, step_ms_min=min(ms), n_steps=len(ms),
        tokens_per_s=tokens / step_s, mfu=flops / step_s / (peak_gflops * 1e9),
        compile_s=compile_, xla_peak_mem_mb=xla_mem, peak_rss_mb=rss,
        xla_flops_per_step=xla_flops, analytic_flops_per_step=flops)
  rows["ours"]["loss_last"] = final_loss
  if ref_runs:
    rows["reference (ref_lm.py)"]["loss_last"] = ref_runs[-1]["loss_last"]

  fmt = lambda x, spec: "n/a" if math.isnan(x) else format(x, spec)
  print("| impl | step time median (ms) | tokens/s | MFU (%) | compile (s) | "
        "peak memory XLA (MB) | peak RSS (MB) | XLA flops/step (G) | "
        "analytic flops/step (G) |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name, r in rows.items():
    print(f"| {name} | {r['step_ms_median']:.2f} | {r['tokens_per_s']:,.0f} | "
          f"{100 * r['mfu']:.1f} | {r['compile_s']:.2f} | "
          f"{fmt(r['xla_peak_mem_mb'], '.1f')} | {fmt(r['peak_rss_mb'], '.0f')} | "
          f"{fmt(r['xla_flops_per_step'] / 1e9, '.2f')} | "
          f"{r['analytic_flops_per_step'] / 1e9:.2f} |")
  if _INPUT_BATCHES.value:
    rows["input pipeline"] = time_input_pipeline(config, _INPUT_BATCHES.value)
    print(f"\ninput pipeline ({config.data.corpus}, one process, no "
          f"training): {rows['input pipeline']['tokens_per_s']:,.0f} tokens/s"
          f" = {rows['input pipeline']['tokens_per_s'] / rows['ours']['tokens_per_s']:,.0f}x"
          " what our step consumes")
  if ref_runs:
    ratio = (rows["ours"]["tokens_per_s"]
             / rows["reference (ref_lm.py)"]["tokens_per_s"])
    print(f"\nours / reference tokens/s: {ratio:.2f}x")
  device = jax.devices()[0]
  command = shlex.join(["python"] + sys.argv)
  # Which GEMMs a bfloat16 step's matmuls ran on (config.precision.
  # cpu_bf16_dots): "bfloat16" or "float32"; None when not bfloat16 on CPU.
  bf16_dots = None
  if config.precision.compute_dtype == "bfloat16" and device.platform == "cpu":
    bf16_dots = model_cfg.dot_dtype or "bfloat16"
    print(f"bfloat16 matmuls: {bf16_dots} GEMMs (config.precision."
          f"cpu_bf16_dots={config.precision.cpu_bf16_dots}; this CPU "
          f"{'has' if cpu.has_bf16_gemm() else 'lacks'} AVX512-BF16/AMX)")
  print(f"\nmatmul peak ({config.precision.compute_dtype}): {peak_gflops:.1f} "
        f"GFLOP/s ({peak_source}); jax {jax.__version__}; "
        f"{jax.device_count()} x "
        f"{device.device_kind} ({device.platform}), mesh {dict(mesh.shape)}; "
        f"{_ROUNDS.value} rounds x {steps} steps, {WARMUP_STEPS} warm-up "
        f"steps per round excluded; reference attention {_REF_ATTN.value}")
  print(f"command: {command}")
  if _OUT.value:
    # NaN (no XLA memory for the reference) -> null: strict JSON readers.
    nan_to_none = lambda x: {k: nan_to_none(v) for k, v in x.items()} if \
        isinstance(x, dict) else None if x != x else x
    with open(_OUT.value, "w") as f:
      json.dump(nan_to_none(dict(rows=rows, matmul_peak_gflops=peak_gflops,
                     jax_version=jax.__version__,
                     device_kind=device.device_kind,
                     device_count=jax.device_count(),
                     mesh=dict(mesh.shape), steps=steps, rounds=_ROUNDS.value,
                     bf16_dots=bf16_dots,
                     ours_step_ms=ours_ms, ref_runs=ref_runs, command=command)),
                f, indent=1)


if __name__ == "__main__":
  cli.run(main)
