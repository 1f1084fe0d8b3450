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
# peer_torch, decode, hf_round_trip and import_memory compare with PyTorch /
# transformers: the test dependencies (`make test` installs them).
for name in presets collectives context_memory speed peer_torch step_profile \
    perf_options scaling compile_cache init_compile decode compression_speed \
    pipeline_bubble multihost parallelism import_memory demo time_to_quality \
    families tokenizers compression_modes finetune lora_sizes privacy \
    privacy_lm sweep hf_round_trip aot_search aot tpu_attention; do
  echo "== benchmarks/$name.py"
  "$PY" "benchmarks/$name.py"
done
# benchmarks/gpu.py needs a GPU: run it on one (docs/performance.md, "One
# GPU"), then render.
"$PY" benchmarks/render_docs.py
