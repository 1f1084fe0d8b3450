"""The backend programs are built for: this process's default backend, or
the target of an ahead-of-time compile. lm/run/aot.py compiles for a TPU
slice on a CPU host, so what only a TPU can run (a remat policy that
offloads to host memory, bfloat16 gradient all-reduces) is judged for the
TPU, not for the CPU that compiles."""
from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lm_target_backend", default=None)


def name() -> str:
  """"cpu", "gpu" or "tpu": the target inside `target(...)`, else jax's
  default backend."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target(platform: str):
  """Checks and traces inside the block are for `platform`."""
  token = _TARGET.set(platform)
  try:
    yield platform
  finally:
    _TARGET.reset(token)
