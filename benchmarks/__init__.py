"""Measurement scripts: each writes benchmarks/results/NAME.json and renders
the docs tables from it (see benchmarks/common.py)."""
