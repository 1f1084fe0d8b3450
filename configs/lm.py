r"""Byte-level decoder-only Transformer LM on Shakespeare.

python scripts/train.py --config=configs/lm.py:tiny --workdir=runs/tiny

Presets (the part after the colon):
  tiny   the CPU tests (8 simulated devices; `make demo`'s recipe until
         2026-11-30).
  demo   `make demo`: tiny's shapes trained for about 5 minutes on 8
         simulated CPU devices (data=2 x fsdp=2 x tensor=2), with what
         reached 2.2 validation bits per byte there in the least time
         (docs/performance.md, "Time to quality"). With bytes as tokens as
         it stands; `make demo` adds a 1,024-piece byte-level BPE trained
         first (benchmarks/demo.py says how).
  small  a single accelerator.
  1b     TinyLlama's shapes (about 1B parameters with the byte vocabulary):
         TPU pod slices / GPU nodes (FSDP over all devices). On one GPU
         with memory to spare, --config.model.remat=dots is faster
         (docs/performance.md, "One GPU").
  bench  the reference shapes of ../shared/bench/ref_lm.py (GELU MLP, tied
         embeddings, seq 256, batch 16) for scripts/benchmark.py.
  long   tiny's width with 4096-token windows, ring attention over
         sequence=8 (context parallelism; each device holds 512 tokens).
  moe    tiny with 8 SwiGLU experts (top-2) per layer, split over expert=4.
  8b     Llama-3-8B's shapes (8,030,261,248 parameters) and
  70b    Llama-3-70B's (70,553,706,496), vocabulary included: TPU slices,
         with the mesh and remat the TPU compiler chose (docs/planning.md;
         plan a slice with scripts/aot_compile.py --topology=...).
Pipeline parallelism is a mesh shape (layers must be scanned):
  --config.mesh.stage=2 --config.model.scan_layers=True
  --config.train.microbatches=4
Parameter counts: README "Presets". Every key and its default: lm/config.py
(the model's: lm/models/transformer.py).
Override anything: --config.mesh.fsdp=4 --config.train.steps=100 ...
"""
import ml_collections

from lm import config as base_config

# What Llama-3-8B and -70B share (Hugging Face config.json: vocab_size,
# rope_theta, rms_norm_eps, tie_word_embeddings, max_position_embeddings).
LLAMA3 = dict(vocab_size=128_256, n_kv_heads=8, max_len=8192,
              rope_base=500_000.0, norm_eps=1e-5, tie_embeddings=False,
              scan_layers=True, remat="full")
TINY = dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512,
            max_len=256)
SIZES = {
    "tiny": TINY,
    # tiny without GQA (4 key/value heads learned more per second).
    "demo": dict(TINY, n_kv_heads=4),
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
    # Llama 3's published shapes, vocabulary included (128,256 rows, untied
    # output head), so the parameter count and FLOPs are Llama 3's: a plan
    # made with them holds for its imported weights and tokenizer. The byte
    # tokenizer (the default) uses 256 of those rows.
    "8b": dict(LLAMA3, d_model=4096, n_layers=32, n_heads=32, d_ff=14336),
    "70b": dict(LLAMA3, d_model=8192, n_layers=80, n_heads=64, d_ff=28672),
}
# Quantized, pruned and LoRA-adapted: every attention and MLP projection;
# the embedding (tied with the output head) stays float.
LAYERS = (r".*blocks/(\d+/)?(attn/[qkvo]|mlp/(gate|up|down))",)


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"configs/lm.py:{size} is unknown; use one of "
                     f"{sorted(SIZES)}.")
  c = base_config.base("transformer")
  c.model.update(SIZES[size])
  cpu_sized = size in ("tiny", "demo", "bench", "long", "moe")
  c.precision.compute_dtype = "float32" if cpu_sized else "bfloat16"
  c.optimizer.update(
      learning_rate=3e-3 if cpu_sized else 3e-4,
      warmup_steps=50 if cpu_sized else 2000,
      end_learning_rate_fraction=0.1, b1=0.9, b2=0.95, weight_decay=0.1,
      grad_clip_norm=1.0)
  c.train.update(steps=400 if cpu_sized else 100_000,
                 batch_size=32 if cpu_sized else 256,
                 eval_every=100)
  if size == "bench":
    c.train.batch_size = 16
    c.mesh.update(data=1)
  if size == "1b":
    c.mesh.update(data=1, fsdp=-1)
  if size in ("8b", "70b"):
    c.mesh.update(data=1, fsdp=-1)
  if size == "demo":
    # A 5-minute run on 2 cores: on that mesh a step's time grows with its
    # tokens, so small batches and more steps learn more per second;
    # bfloat16 GEMMs where the CPU has BF16 instructions (precision.
    # cpu_bf16_dots=auto); weight decay helped most, up to 0.2.
    c.precision.compute_dtype = "bfloat16"
    c.optimizer.update(end_learning_rate_fraction=0.0, weight_decay=0.2)
    c.train.update(batch_size=8, steps=1850, eval_every=500,
                   # The tests' 8 batches of 32: 256 windows.
                   eval_batches=32, checkpoint_every=0)
    c.mesh.update(data=2, fsdp=2, tensor=2)
  if size == "long":
    c.mesh.update(data=1, sequence=-1)
    c.train.update(batch_size=8, steps=200, eval_every=100, eval_batches=2)
  if size == "moe":
    c.model.moe.experts = 8
    c.mesh.update(data=-1, expert=4)
  c.quant.layers = LAYERS
  c.prune.layers = tuple(f"{p}/kernel" for p in LAYERS)
  c.lora.layers = LAYERS  # Used when --config.lora.rank > 0.
  return c
