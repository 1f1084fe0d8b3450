"""Sharded JAX/Flax training, in layers whose imports point down: checks and
paths, parallel, models, config, data, quant, train (the engine), tasks, run
(docs/design.md; tests/test_layers.py keeps the shape)."""
