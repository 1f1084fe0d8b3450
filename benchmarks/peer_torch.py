r"""Speed against PyTorch: our train step and Hugging Face transformers'
LlamaForCausalLM on PyTorch, the same Llama-shaped model, same work.

    python benchmarks/peer_torch.py [--steps=12 --rounds=3] \
        [--dtypes=float32,bfloat16] [--overrides=model.n_kv_heads=2 ...]

The model: configs/lm.py:bench with Llama's blocks (SwiGLU MLP, d_ff 683: the
bench preset's GELU-1024 parameter count; RMSNorm, RoPE, tied embeddings,
vocabulary 256, 4 layers, d_model 256, 4 heads, sequence 256, batch 16), one
device. `--overrides` (config keys, space-separated) varies it: GQA
(model.n_kv_heads), untied (model.tie_embeddings=False), ...

Equal work, checked before any timing (the run fails otherwise):
- PyTorch's model is `from_pretrained` of our initial weights, written by our
  Hugging Face exporter (lm/interop), so both count the same parameters and
  both sides' first-step losses on the same batch agree (float32: within
  1e-4 relative; bfloat16: 3e-2 relative, bfloat16's rounding of the
  activations);
- both train on the same token batches, with the same AdamW (betas, eps,
  decoupled weight decay on matrices only), global-norm clipping at 1.0, and
  the loss on float32 logits; the learning-rate schedule is ours only (its
  cost is a scalar);
- MFU for both from the same analytic FLOPs (lm/models/transformer.py's
  flops_per_token) against the matmul peak measured in the same run.
PyTorch 2.13.0 (CPU), fused AdamW, `sdpa` attention, as many threads as JAX
uses (the affinity mask), each side in its own process
(benchmarks/torch_step.py) while this one idles. Each round runs PyTorch
eager, then torch.compile, then ours, `steps` steps each, the first 2 of a
round warm-up, so the sides share the machine's drift. Compile: ours is
`lower().compile()`; torch.compile's is its first step's time beyond a
steady step (it compiles lazily), in the first round, with an empty
inductor cache (later rounds reuse it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from lm import cpu

NAME = "peer_torch"
DTYPES = ("float32", "bfloat16")
WARMUP = 2
LLAMA = ("model.mlp=swiglu", "model.d_ff=683")
OURS, EAGER, COMPILED = "ours", "PyTorch eager", "PyTorch torch.compile"
SIDES = (OURS, EAGER, COMPILED)
# The first-step losses at the same weights agree within (relative):
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 3e-2}


def _config(dtype: str, overrides: list[str]):
  from configs import lm as lm_config  # noqa: PLC0415
  from benchmarks.interleaved import _override  # noqa: PLC0415
  config = lm_config.get_config("bench")
  return _override(config, ";".join(
      [*LLAMA, *overrides, f"precision.compute_dtype={dtype}"]))


def _torch(tmp: Path, dtype: str, compiled: bool, opt) -> dict:
  # -m, not the file: benchmarks/tokenizers.py would shadow the package.
  cmd = [sys.executable, "-m", "benchmarks.torch_step",
         f"--hf_dir={tmp / 'hf'}", f"--tokens={tmp / 'tokens.npy'}",
         f"--dtype={dtype}", f"--lr={opt.learning_rate}", f"--b1={opt.b1}",
         f"--b2={opt.b2}", f"--eps={opt.eps}",
         f"--weight_decay={opt.weight_decay}", f"--clip={opt.grad_clip_norm}"]
  if compiled:
    cmd.append("--compile")
  # The run's own inductor cache: the first round compiles cold, as ours.
  env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"))
  out = common.run(cmd, env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


def gemm_shapes(cfg, tokens: int) -> list[tuple[int, int, int]]:
  """(M, K, N) of the step's projection GEMMs: forward (tokens x d_model
  into d_model or d_ff, d_ff into d_model) and the weight gradients, which
  contract over the tokens."""
  D, F = cfg.d_model, cfg.d_ff
  return [(tokens, D, D), (tokens, D, F), (tokens, F, D), (D, tokens, F),
          (F, tokens, D)]


def gemm_rates(dtype: str, shapes, threads: int) -> dict:
  """GFLOP/s of one GEMM per shape: XLA:CPU (a jitted jnp.dot with a
  float32 result, as our model's matmuls) and torch.matmul, one process
  each."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from benchmarks.torch_step import gemm_seconds  # noqa: PLC0415
  ours, dot = {}, jax.jit(lambda a, b: jnp.dot(
      a, b, preferred_element_type=jnp.float32))
  for m, k, n in shapes:
    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    seconds = gemm_seconds(lambda: dot(a, b).block_until_ready())
    ours[f"{m},{k},{n}"] = 2 * m * k * n / seconds / 1e9
  torch = json.loads(common.run([
      sys.executable, "-m", "benchmarks.torch_step", f"--dtype={dtype}",
      f"--threads={threads}", "--gemms=" + ";".join(
          f"{m},{k},{n}" for m, k, n in shapes)]).stdout.splitlines()[-1])
  return {"xla": ours, "torch": torch["gflops"]}


def measure(dtype: str, steps: int, rounds: int, overrides: list[str],
            torch_compile: bool) -> dict:
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import lm.parallel  # noqa: PLC0415
  import lm.tasks  # noqa: PLC0415
  import lm.train.state  # noqa: PLC0415
  import lm.train.step  # noqa: PLC0415
  from lm.data import pipeline  # noqa: PLC0415
  from lm.interop import hf_config, hf_weights  # noqa: PLC0415
  from lm.models import transformer  # noqa: PLC0415
  from lm.run import perf  # noqa: PLC0415

  config = _config(dtype, overrides)
  peak, peak_source = perf.peak_flops(dtype, jax.devices()[:1],
                                      remeasure=True)
  mesh = lm.parallel.make_mesh(config.mesh, jax.devices()[:1])
  seq, batch = pipeline.seq_len(config), config.train.batch_size
  with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as tmp_name:
    tmp = Path(tmp_name)
    setup = lm.train.state.make_setup(config, mesh)
    cfg = setup.model_cfg
    state = setup.init_fn(jax.random.key(config.seed))
    # Our initial weights, as PyTorch's starting point.
    (tmp / "hf").mkdir()
    hf_weights.write(state.params, hf_weights.tensors(cfg), tmp / "hf",
                     np.float32, max_shard_bytes=2**40)
    hf = hf_config.hf_from_model(cfg, dtype="float32", bos_id=None, eos_id=0,
                                 where="benchmarks/peer_torch.py")
    (tmp / "hf" / "config.json").write_text(json.dumps(hf))
    # Token 0 never appears, as in scripts/benchmark.py.
    tokens = np.random.default_rng(0).integers(
        1, cfg.vocab_size, (steps, batch, seq + 1), np.int32)
    np.save(tmp / "tokens.npy", tokens)
    batches = [{"tokens": jax.device_put(t, setup.batch_sharding())}
               for t in tokens]
    fn = lm.train.step.jit_train_step(setup, lm.tasks.get(config),
                                      config.train.grad_accum_steps)
    t = time.perf_counter()
    compiled = fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t
    n_params = sum(int(np.prod(x.shape))
                   for x in jax.tree.leaves(state.params))

    times = {side: [] for side in SIDES}
    compiles = {EAGER: [], COMPILED: []}
    first_loss, torch_runs = None, []
    for r in range(rounds):
      for side, on in ((EAGER, False), (COMPILED, True)):
        if on and not torch_compile:
          continue
        run = _torch(tmp, dtype, on, config.optimizer)
        torch_runs.append(dict(run, side=side, round=r))
        times[side] += run["times_ms"][WARMUP:]
        compiles[side].append(run["compile_s"])
      for i, b in enumerate(batches):
        t = time.perf_counter()
        state, metrics = compiled(state, b)  # The state is donated.
        jax.block_until_ready((state, metrics))
        if i >= WARMUP:
          times[OURS].append((time.perf_counter() - t) * 1e3)
        if first_loss is None:
          first_loss = float(metrics["loss"])

  flops = transformer.flops_per_token(cfg, seq) * batch * seq
  losses = {OURS: first_loss, **{run["side"]: run["loss_first"]
                                 for run in torch_runs}}
  params = {OURS: n_params, **{run["side"]: run["params"]
                               for run in torch_runs}}
  if len(set(params.values())) != 1:
    raise RuntimeError(f"{dtype}: unequal work, parameter counts {params}")
  for side, loss in losses.items():
    if abs(loss - first_loss) > LOSS_RTOL[dtype] * abs(first_loss):
      raise RuntimeError(f"{dtype}: unequal work, first-step losses {losses}")
  rows = {}
  for side in SIDES:
    if not times[side]:
      continue
    step_s = statistics.median(times[side]) / 1e3
    rows[side] = dict(
        step_ms_median=step_s * 1e3, step_ms_min=min(times[side]),
        n_steps=len(times[side]), tokens_per_s=batch * seq / step_s,
        mfu=flops / step_s / peak, loss_first=losses[side],
        compile_s=(compile_s if side == OURS else None if side == EAGER
                   else compiles[side][0]))
  gemms = gemm_rates(dtype, gemm_shapes(cfg, batch * seq),
                     torch_runs[0]["threads"])
  return {"rows": rows, "gemm_gflops": gemms, "params": n_params,
          "flops_per_step": flops,
          "matmul_peak_gflops": peak / 1e9, "peak_source": peak_source,
          "model": {k: getattr(cfg, k) for k in (
              "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "mlp",
              "tie_embeddings", "vocab_size")},
          "seq_len": seq, "batch_size": batch, "overrides": overrides,
          "torch": torch_runs[0]["torch"],
          "transformers": torch_runs[0]["transformers"],
          "threads": torch_runs[0]["threads"], "torch_runs": torch_runs,
          "ours_step_ms": times[OURS]}


def tables(results: dict) -> dict[str, str]:
  rows = []
  for dtype in DTYPES:
    run = results["runs"].get(dtype)
    if run is None:
      continue
    eager = run["rows"][EAGER]["tokens_per_s"]
    for side in SIDES:
      r = run["rows"].get(side)
      if r is None:
        continue
      rows.append([dtype, side, f"{r['step_ms_median']:.1f}",
                   f"{r['tokens_per_s']:,.0f}",
                   f"{r['tokens_per_s'] / eager:.2f}x",
                   f"{100 * r['mfu']:.1f}",
                   "–" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
                   f"{r['loss_first']:.5f}"])
  gemm_rows = []
  for dtype in DTYPES:
    run = results["runs"].get(dtype)
    if run is None or "gemm_gflops" not in run:
      continue
    xla, torch = run["gemm_gflops"]["xla"], run["gemm_gflops"]["torch"]
    for shape in xla:
      m, k, n = shape.split(",")
      gemm_rows.append([dtype, f"{m} x {k} x {n}", f"{xla[shape]:,.0f}",
                        f"{torch[shape]:,.0f}",
                        f"{xla[shape] / torch[shape]:.2f}x"])
  return {"table": common.markdown(
      ["compute dtype", "implementation", "step time median (ms)", "tokens/s",
       "vs PyTorch eager", "MFU (%)", "compile (s)",
       "first-step loss (same weights)"], rows, "llrrrrrr"),
          "gemms": common.markdown(
      ["dtype", "GEMM M x K x N", "XLA:CPU (GFLOP/s)",
       "PyTorch (GFLOP/s)", "XLA / PyTorch"], gemm_rows, "llrrr")}


def main() -> None:
  cpu.use_huge_pages()  # As a script does: our steps run in this process.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=12,
                      help=f"Steps per round and side, {WARMUP} of them "
                      "warm-up.")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dtypes", default=",".join(DTYPES))
  parser.add_argument("--overrides", nargs="*", default=[],
                      help="Config overrides KEY=VALUE for both sides.")
  parser.add_argument("--no_torch_compile", action="store_true",
                      help="Skip the torch.compile side.")
  common.add_out_flag(parser, NAME)
  args = parser.parse_args()
  dtypes = common.parse_only(parser, args.dtypes, DTYPES)
  if args.steps <= WARMUP:
    parser.error(f"--steps must exceed the {WARMUP} warm-up steps.")
  runs = {dtype: measure(dtype, args.steps, args.rounds, args.overrides,
                         not args.no_torch_compile) for dtype in dtypes}
  data = {"steps": args.steps, "rounds": args.rounds, "runs": runs}
  path = common.write(NAME, data, args.out)
  print(tables(json.loads(path.read_text()))["table"])
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
