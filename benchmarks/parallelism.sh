#!/usr/bin/env bash
# Short training runs of each parallelism strategy on 8 simulated CPU devices,
# for the README's "Parallelism strategies" table:
#   bash benchmarks/parallelism.sh && python benchmarks/parallelism_table.py
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_FLAGS=--xla_force_host_platform_device_count=8
OUT=${OUT:-runs/parallelism}
PY=${PY:-.venv/bin/python}
STEPS="--config.train.steps=100 --config.train.eval_every=100 --config.train.checkpoint_every=0"

train() {
  local name=$1; shift
  rm -rf "$OUT/$name"
  "$PY" scripts/train.py --workdir="$OUT/$name" "$@"
}

train data8 --config=configs/lm.py:tiny $STEPS --config.mesh.data=8
train fsdp2_tensor2_data2 --config=configs/lm.py:tiny $STEPS \
  --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2
train ring_data2_sequence4 --config=configs/lm.py:tiny $STEPS \
  --config.mesh.data=2 --config.mesh.sequence=4
# Scanned layers initialize differently (one key split over the stack): the
# pipeline's own one-device-equivalent reference.
train data8_scanned --config=configs/lm.py:tiny $STEPS --config.mesh.data=8 \
  --config.model.scan_layers=True
train pipeline_data2_stage2_tensor2 --config=configs/lm.py:tiny $STEPS \
  --config.mesh.data=2 --config.mesh.stage=2 --config.mesh.tensor=2 \
  --config.model.scan_layers=True --config.train.microbatches=4
train moe_data2_expert4 --config=configs/lm.py:moe $STEPS
train long_ring_sequence8 --config=configs/lm.py:long \
  --config.train.steps=20 --config.train.eval_every=20 \
  --config.train.checkpoint_every=0 --config.train.log_every=5
