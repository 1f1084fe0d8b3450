#!/bin/bash
# Step time and compile time of each performance option at the reference
# shapes (configs/lm.py:bench, one CPU device), one benchmark run each:
#   bash benchmarks/perf_options.sh [OUT_DIR]   (default runs/perf_options)
# Then: python benchmarks/perf_options_table.py OUT_DIR
set -euo pipefail
OUT=${1:-runs/perf_options}
mkdir -p "$OUT"
run() {  # name, overrides...
  local name=$1; shift
  python scripts/benchmark.py --config=configs/lm.py:bench --steps=14 \
    --rounds=2 --input_batches=0 --out="$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  echo "$name done"
}
run plain_autodiff --config.model.einsum_grad=autodiff
run default
run attention_xla --config.model.attention_impl=xla
run attention_chunks_1 --config.model.attention_chunks=1
run attention_chunks_4 --config.model.attention_chunks=4
run fused_qkv --config.model.fused_qkv=True
run scan --config.model.scan_layers=True
run remat_full --config.model.remat=full
run remat_dots --config.model.remat=dots
run remat_dots_no_batch --config.model.remat=dots_no_batch
run bf16 --config.precision.compute_dtype=bfloat16
run bf16_autodiff --config.precision.compute_dtype=bfloat16 --config.model.einsum_grad=autodiff
run bf16_attention_xla --config.precision.compute_dtype=bfloat16 --config.model.attention_impl=xla
