"""Serving: continuous batching (engine.py), the OpenAI-compatible HTTP API
(api.py)."""
