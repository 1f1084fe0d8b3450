r"""Byte-level decoder-only Transformer LM on Shakespeare.

python scripts/train.py --config=configs/lm.py:tiny --workdir=runs/tiny

Presets (the part after the colon):
  tiny   ~1.0M params: the CPU demo and tests (8 simulated devices).
  small  ~26M params: a single accelerator.
  1b     ~1.1B params: TPU pod slices / GPU nodes (FSDP over all devices).
  bench  the reference shapes of ../shared/bench/ref_lm.py (GELU MLP, tied
         embeddings, seq 256, batch 16) for scripts/benchmark.py.
  long   tiny's width with 4096-token windows, ring attention over
         sequence=8 (context parallelism; each device holds 512 tokens).
  moe    tiny with 8 SwiGLU experts (top-2) per layer, split over expert=4.
Pipeline parallelism is a mesh shape (layers must be scanned):
  --config.mesh.stage=2 --config.model.scan_layers=True
  --config.train.microbatches=4
Override anything: --config.mesh.fsdp=4 --config.train.steps=100 ...
"""
import ml_collections

from configs import compression

SIZES = {
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512,
                 max_len=256),
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4,
                  d_ff=1408, max_len=1024),
    # TinyLlama-like shapes: 22 x (GQA 32/4 heads, SwiGLU 5632).
    "1b": dict(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
               d_ff=5632, max_len=2048, scan_layers=True, remat="full"),
    # Same FLOPs per token as the reference: GELU MLP with 4x width.
    "bench": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                  d_ff=1024, max_len=256, mlp="gelu"),
    "long": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512,
                 max_len=4096, remat="full"),
    "moe": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=256,
                max_len=256),
}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"configs/lm.py:{size} is unknown; use one of "
                     f"{sorted(SIZES)}.")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = dict(
      name="transformer",
      vocab_size=256,  # Bytes.
      mlp="swiglu",
      tie_embeddings=True,
      scan_layers=False,  # True: nnx.scan over layers (faster compile).
      remat="none",  # none | full | dots | dots_no_batch.
      # Projection weight gradients: "small_left" puts the smaller operand on
      # the GEMM's left (1.5x faster steps on CPU, lm/models/layers.py) |
      # "autodiff". QAT and int8 serving always use autodiff.
      einsum_grad="small_left",
      # One q/k/v projection instead of three (another parameter tree).
      fused_qkv=False,
      # Attention core (lm/models/attention.py): "chunked" (ours: skips the
      # masked key blocks of causal attention, flash-style backward), "xla"
      # or "cudnn" (GPU) from jax.nn.dot_product_attention.
      attention_impl="chunked",
      attention_chunks=2,  # Query chunks for "chunked" (compile time grows).
      # Attention over a mesh.sequence > 1 (lm/parallel/context.py): "ring"
      # (ppermute K/V around the ring, O(L/n) memory) or "all_gather".
      context_parallel="ring",
      # Mixture of experts (lm/models/moe.py); experts=0 is a dense MLP.
      moe=dict(experts=0, top_k=2,
               capacity_factor=1.25,  # Slots per expert vs. an even split.
               z_loss=1e-3,  # Router z-loss weight.
               load_balance=1e-2))  # Load-balancing loss weight.
  c.model.update(SIZES[size])
  # Device mesh; one axis may be -1 (all remaining devices). Each axis is a
  # strategy (lm/parallel/rules.py): data, stage (GPipe pipeline), fsdp
  # (ZeRO-3), expert (MoE experts; a data axis elsewhere), sequence (ring
  # attention), tensor (Megatron). Unlisted axes are 1.
  c.mesh = dict(data=-1, stage=1, fsdp=1, expert=1, sequence=1, tensor=1)
  # Of each axis, how many slices it spans (TPU multislice: the data-center
  # network between slices; elsewhere each process counts as a slice). Only
  # `data` (and `stage`) should: e.g. --config.mesh_dcn.data=4 on 4 slices.
  c.mesh_dcn = dict(data=1, stage=1)
  accel = size in ("small", "1b")
  cpu_sized = size in ("tiny", "bench", "long", "moe")
  c.precision = dict(
      # float32 | bfloat16 | float16 (with dynamic loss scaling).
      compute_dtype="bfloat16" if accel else "float32",
      param_dtype="float32",  # Params and optimizer state stay float32.
      # float16 only (lm/train/precision.py): the starting scale, doubled
      # after `growth_interval` finite steps, halved on each overflow.
      loss_scale=dict(initial=2.0 ** 15, growth_interval=2000, factor=2.0))
  c.optimizer = dict(
      name="adamw",  # adamw | adafactor | lion | sgd | momentum | adagrad.
      learning_rate=3e-3 if cpu_sized else 3e-4,
      schedule="cosine",  # constant | cosine | linear (after warmup).
      warmup_steps=50 if cpu_sized else 2000,
      end_learning_rate_fraction=0.1,
      b1=0.9, b2=0.95,
      weight_decay=0.1,  # Decoupled; masked off vectors (norms, biases).
      grad_clip_norm=1.0)
  c.train = dict(
      steps=400 if cpu_sized else 100_000,
      batch_size=32 if cpu_sized else 256,  # Global.
      grad_accum_steps=1,  # Microbatches per step (same math, less memory).
      # GPipe microbatches per (accumulation) step when mesh.stage > 1: the
      # bubble is (stages - 1) / (microbatches + stages - 1).
      microbatches=1,
      # auto: XLA inserts the gradient all-reduce; psum: an explicit shard_map
      # psum over the data axis (lm/parallel/reduce.py), in this dtype.
      grad_reduce="auto",
      grad_reduce_dtype="float32",  # float32 | bfloat16 (GPU/TPU only).
      log_every=20,
      eval_every=100,
      eval_batches=8,  # Fixed validation batches per eval.
      checkpoint_every=200,
      max_checkpoints=3)
  c.data = dict(
      corpus="shakespeare",  # shakespeare | python_stdlib | text_dir.
      text_dir="",  # For corpus=text_dir: a directory of .txt files.
      data_dir="",  # tfds data dir; "" = $LM_DATA_DIR or ~/.cache/lm/...
      tokenizer="byte",
      seq_len=0)  # Training window; 0 = config.model.max_len.
  if size == "bench":
    c.train.batch_size = 16
    c.mesh = dict(data=1, fsdp=1, tensor=1)
  if size == "1b":
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
  if size == "long":
    c.mesh = dict(data=1, sequence=-1)
    c.train.update(batch_size=8, steps=200, eval_every=100, eval_batches=2)
  if size == "moe":
    c.model.moe.experts = 8
    c.mesh = dict(data=-1, expert=4)
  # QAT / distillation / pruning, all off by default (configs/compression.py).
  # Quantized and pruned: every attention and MLP projection; the embedding
  # (tied with the output head) stays float.
  c.update(compression.defaults(
      layers=(r".*blocks/(\d+/)?(attn/[qkvo]|mlp/(gate|up|down))",)))
  return c
