#!/usr/bin/env bash
# Every compression mode against its float32 baseline, on the same data and
# steps: the tiny LM on Shakespeare (400 steps) and the MLP on digits (1,500
# steps), 8 simulated CPU devices (data=8). Then the int8 serving models
# (QAT-converted and PTQ) and the README table:
#
#   bash benchmarks/compression.sh [OUT=runs/compression]
#   .venv/bin/python benchmarks/compression_table.py runs/compression
#
# Runs are sequential (step times are comparable); an existing run resumes
# (or is skipped if finished), so the script can be rerun after a stop.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compression}
PY=.venv/bin/python
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"

train() {  # name config [overrides...]
  local name=$1 config=$2; shift 2
  echo "== $name"
  $PY scripts/train.py --config="$config" --workdir="$OUT/$name" "$@" \
      2>&1 | grep -E "final eval|Error" || true
}
serve() {  # source name [flags...]
  local src=$1 name=$2; shift 2
  echo "== $name (from $src)"
  [ -d "$OUT/$name" ] || $PY scripts/quantize.py --workdir="$OUT/$src" \
      --out="$OUT/$name" "$@" 2>&1 | tail -n 1
}
evaluate() {  # name: test-split metrics into OUT/name/eval.txt
  $PY scripts/eval.py --workdir="$OUT/$1" 2>&1 | tail -n 1 \
      | tee "$OUT/$1/eval.txt"
}

LM=configs/lm.py:tiny
STUDENT=(--config.model.d_model=64 --config.model.n_layers=2
         --config.model.d_ff=256)
train lm_float32 $LM
train lm_bfloat16 $LM --config.precision.compute_dtype=bfloat16
train lm_float16 $LM --config.precision.compute_dtype=float16
train lm_int8 $LM --config.quant.mode=int8
train lm_int4_weights $LM --config.quant.mode=int4_weights
train lm_fp8 $LM --config.quant.mode=fp8
train lm_prune50 $LM --config.prune.sparsity=0.5
train lm_prune80 $LM --config.prune.sparsity=0.8
train lm_student $LM "${STUDENT[@]}"
train lm_student_distilled $LM "${STUDENT[@]}" \
    --config.distill.teacher_workdir="$OUT/lm_float32"
serve lm_int8 lm_int8_serving
serve lm_float32 lm_ptq_serving

MLP=configs/mlp_digits.py
MLP_STUDENT=(--config.model.width=128 --config.model.depth=1)
train mlp_float32 $MLP
train mlp_bfloat16 $MLP --config.precision.compute_dtype=bfloat16
train mlp_float16 $MLP --config.precision.compute_dtype=float16
train mlp_int8 $MLP --config.quant.mode=int8
train mlp_int4_weights $MLP --config.quant.mode=int4_weights
train mlp_fp8 $MLP --config.quant.mode=fp8
train mlp_prune50 $MLP --config.prune.sparsity=0.5
train mlp_prune80 $MLP --config.prune.sparsity=0.8
train mlp_student $MLP "${MLP_STUDENT[@]}"
train mlp_student_distilled $MLP "${MLP_STUDENT[@]}" \
    --config.distill.teacher_workdir="$OUT/mlp_float32"
serve mlp_int8 mlp_int8_serving
serve mlp_float32 mlp_ptq_serving

for run in lm_float32 lm_int8 lm_int8_serving lm_ptq_serving mlp_float32 \
           mlp_int8 mlp_int8_serving mlp_ptq_serving; do
  evaluate $run
done
