r"""One side of benchmarks/peer_torch.py: Hugging Face transformers'
LlamaForCausalLM trained on PyTorch (CPU), timed step by step.

    python -m benchmarks.torch_step --hf_dir=DIR --tokens=T.npy \
        --dtype=float32|bfloat16 [--compile] [--threads=2] [--lr=3e-3 ...]

Run by peer_torch.py as its own process (torch's thread pool never shares a
process with XLA's). The model is `from_pretrained(DIR)`: our initial weights
exported with our exporter, so the first step's loss is comparable with ours
(the equal-work check). Each step is what lm's train step does:
forward, next-token cross-entropy on float32 logits, backward, global-norm
clipping, AdamW with decoupled weight decay on the parameters of two or more
dimensions (lm/train/optim.py's mask), zero the gradients. bfloat16 is
torch.autocast over float32 parameters: our mixed precision (float32 master
weights, bfloat16 compute). The last stdout line is JSON: times_ms (every
step, warm-up included), loss_first, params, compile_s (--compile: the
first step's time beyond a steady one).

Test/benchmark-only dependencies: torch==2.13.0 and transformers
(requirements-test.txt).
"""
import argparse
import json
import os
import statistics
import time


def gemm_seconds(f, reps: int = 30) -> float:
  """Median seconds of f() after 3 warm-up calls (f returns when done)."""
  for _ in range(3):
    f()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--hf_dir")
  p.add_argument("--tokens", help=".npy of int32 [steps, batch, seq + 1] "
                 "token ids.")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), required=True)
  p.add_argument("--gemms", default="",
                 help="Instead of training: time torch.matmul at these "
                 "M,K,N shapes (M,K,N;M,K,N...) and print GFLOP/s.")
  p.add_argument("--compile", action="store_true",
                 help="torch.compile the model (forward and backward).")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--b1", type=float, default=0.9)
  p.add_argument("--b2", type=float, default=0.95)
  p.add_argument("--eps", type=float, default=1e-8)
  p.add_argument("--weight_decay", type=float, default=0.1)
  p.add_argument("--clip", type=float, default=1.0, help="0: no clipping.")
  a = p.parse_args()

  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  torch.set_num_threads(a.threads)
  if a.gemms:
    dtype = getattr(torch, a.dtype)
    operands = {}
    for shape in a.gemms.split(";"):
      m, k, n = map(int, shape.split(","))
      operands[shape] = (torch.randn(m, k, dtype=dtype),
                         torch.randn(k, n, dtype=dtype), 2 * m * k * n)
    # oneDNN's first GEMMs run far below its rate for a while (kernel
    # generation, AMX set-up): a second of warm-up before any timing.
    start = time.perf_counter()
    while time.perf_counter() - start < 1.0:
      for x, w, _ in operands.values():
        x @ w
    rates = {shape: flops / gemm_seconds(lambda: x @ w) / 1e9
             for shape, (x, w, flops) in operands.items()}
    print(json.dumps({"gflops": rates, "threads": a.threads}))
    return
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      a.hf_dir, dtype=torch.float32, attn_implementation="sdpa")
  model.train()
  params = [q for q in model.parameters() if q.requires_grad]
  decay = [q for q in params if q.ndim >= 2]
  no_decay = [q for q in params if q.ndim < 2]
  # fused: PyTorch's fastest CPU AdamW (one kernel over all parameters).
  opt = torch.optim.AdamW(
      [{"params": decay, "weight_decay": a.weight_decay},
       {"params": no_decay, "weight_decay": 0.0}],
      lr=a.lr, betas=(a.b1, a.b2), eps=a.eps, fused=True)
  forward = torch.compile(model) if a.compile else model
  tokens = torch.from_numpy(np.load(a.tokens).astype(np.int64))
  autocast = torch.autocast("cpu", dtype=torch.bfloat16,
                            enabled=a.dtype == "bfloat16")

  def step(tokens_BxL1):
    inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
    with autocast:
      logits_BxLxV = forward(input_ids=inputs_BxL).logits
    loss = torch.nn.functional.cross_entropy(
        logits_BxLxV.float().flatten(0, 1), targets_BxL.flatten())
    loss.backward()
    if a.clip:
      torch.nn.utils.clip_grad_norm_(params, a.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  times_ms, losses = [], []
  for tokens_BxL1 in tokens:
    t = time.perf_counter()
    losses.append(float(step(tokens_BxL1)))  # float(): the step is done.
    times_ms.append((time.perf_counter() - t) * 1e3)
  steady = statistics.median(times_ms[2:]) if len(times_ms) > 2 else 0.0
  print(json.dumps({
      "times_ms": times_ms, "loss_first": losses[0], "loss_last": losses[-1],
      "params": sum(q.numel() for q in params),
      "compile_s": (times_ms[0] - steady) / 1e3 if a.compile else None,
      "threads": a.threads, "torch": torch.__version__,
      "transformers": transformers.__version__}))


if __name__ == "__main__":
  main()
