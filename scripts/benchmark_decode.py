r"""Decode speed: our KV-cache decoding and server against Hugging Face
transformers on the same weights (issue 20).

python scripts/benchmark_decode.py [--quick] [--rounds=N] [--out=PATH]

Writes benchmarks/results/decode.json (the docs' "Decode speed" tables in
docs/serving.md; then python benchmarks/render_docs.py). What it measures
and how: benchmarks/decode.py. Needs requirements-test.txt (torch,
transformers, openai).
"""
import sys

from benchmarks import decode

if __name__ == "__main__":
  decode.main(sys.argv)
