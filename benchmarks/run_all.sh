#!/usr/bin/env bash
# Measures every figure the docs publish, then renders the docs' tables:
#
#   bash benchmarks/run_all.sh            (hours on a 2-core CPU)
#
# Timing-sensitive measurements first, one at a time: run it on a quiet
# machine. Any failure stops it (set -e); nothing is half-written, since
# each benchmark writes its JSON only after every one of its runs passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for name in presets collectives context_memory speed perf_options scaling \
    compression_speed pipeline_bubble multihost parallelism demo families \
    compression_modes aot_search aot tpu_attention; do
  echo "== benchmarks/$name.py"
  "$PY" "benchmarks/$name.py"
done
# benchmarks/gpu.py needs a GPU: run it on one (docs/performance.md, "One
# GPU"), then render.
"$PY" benchmarks/render_docs.py
