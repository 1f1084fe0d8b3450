"""Continuous batching: many requests share one compiled decode step.

The engine owns a KV cache of `slots` rows. A request takes a free slot at
the next step boundary, has its prompt prefilled in chunks of
`prefill_chunk` tokens (up to `prefill_batch` slots per prefill step), then
decodes one token per step alongside whatever else is decoding, and frees
its slot when done or cancelled. A long request never blocks a short one:
each loop turn runs one prefill step and one decode step.

Exactly two programs run, compiled ahead of time at start-up (`warm_up`),
so the server never recompiles: a call with other shapes would fail, not
compile.
  prefill: prefill_batch x prefill_chunk tokens written at each row's own
           offset (a per-row cache_index); the prompt's logprobs; the first
           sampled token of rows whose prompt ends in this chunk.
  decode:  slots x 1 tokens, each row at its own position.
Rows are independent in both (each row's math does not read another row),
so a greedy answer does not depend on what else is in the batch; a sampled
one neither: a request's i-th token is drawn with fold_in(key(seed), i).

Cache length S: max_len rounded up to whole chunks. Idle rows of the
decode step write at position max_len - 1, which no request reads (a
request's tokens occupy positions < len(prompt) + max_tokens - 1 <=
max_len - 1). Positions are clamped below max_len (RoPE's table is NaN
beyond it, and a NaN anywhere in the cache would reach every row through
the masked attention sum: 0 * NaN = NaN).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import sample
from lm.models import moe, transformer

# Alternatives reported per token: OpenAI's completions API allows <= 5.
TOP = 5

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Request:
  """One generation. `emit` is called from the engine's thread with
  ("prompt", logprobs, top_ids, top_logprobs) for positions 1.. of the
  prompt (if `prompt_logprobs`), ("token", id, logprob, top_ids,
  top_logprobs) per generated token, then once ("done", reason): "stop"
  (after a stop id, emitted too: its logprob is the last of an echoed
  prompt's, which lm-evaluation-harness reads as the generated one and
  drops), "length", or "abort" (cancelled or the engine stopped)."""
  prompt: np.ndarray  # int32 ids, 1 <= len.
  max_tokens: int
  emit: Callable[..., None]
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop_ids: tuple[int, ...] = ()
  prompt_logprobs: bool = False
  # Engine-side state.
  cancelled: bool = False
  prefilled: int = 0
  generated: int = 0
  last_token: int = 0
  admitted: int = 0  # Admission order: prefill serves the oldest first.

  def cancel(self) -> None:
    """Frees the slot at the next step boundary (any thread)."""
    self.cancelled = True


def _logprobs(logits_xV, targets_x):
  """(log p of each target, the TOP most likely ids and their log p)."""
  lp_xV = jax.nn.log_softmax(logits_xV, axis=-1)
  chosen_x = jnp.take_along_axis(lp_xV, targets_x[..., None], axis=-1)[..., 0]
  top_lp_xT, top_ids_xT = jax.lax.top_k(lp_xV, TOP)
  return chosen_x, top_ids_xT.astype(jnp.int32), top_lp_xT


def _keys(seed_B, count_B):
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(
      seed_B, count_B)


def decode_step(graphdef, params, cache, tokens_B, index_B, seed_B, count_B,
                temperature_B, top_k_B, top_p_B):
  """One token for every slot: writes tokens_B at index_B, returns the
  cache and (next token, its logprob, the top ids and logprobs)."""
  model = nnx.merge(graphdef, params)
  logits_Bx1xV, cache = model(tokens_B[:, None], index_B[:, None],
                              cache=cache, cache_index=index_B)
  logits_BxV = logits_Bx1xV[:, 0]
  next_B = sample.choose_rows(logits_BxV, _keys(seed_B, count_B),
                              temperature_B, top_k_B, top_p_B)
  return cache, (next_B, *_logprobs(logits_BxV, next_B))


def prefill_step(graphdef, params, cache, slots_b, tokens_bxC, start_b,
                 targets_bxC, last_b, seed_b, temperature_b, top_k_b,
                 top_p_b):
  """One chunk of the prompts of slots_b (a slot id >= the cache's rows is
  a padding row: it reads any row and writes nothing). Returns the cache,
  the chunk's logprobs of targets_bxC (the prompt's next tokens), and the
  token sampled after position last_b (the prompt's last, where the
  prompt ends in this chunk)."""
  model = nnx.merge(graphdef, params)
  # The slots' rows, on the batch axis of the model's cache layout.
  at_rows = (slice(None),) * transformer.cache_batch_axis(cache) + (slots_b,)
  rows = jax.tree.map(lambda c: c.at[at_rows].get(mode="clip"), cache)
  # A last chunk's padding can run past max_len: clamped (see above).
  positions_bxC = jnp.minimum(start_b[:, None] + jnp.arange(
      tokens_bxC.shape[1]), model.cfg.max_len - 1)
  logits_bxCxV, rows = model(tokens_bxC, positions_bxC, cache=rows,
                             cache_index=start_b)
  cache = jax.tree.map(lambda c, r: c.at[at_rows].set(r, mode="drop"),
                       cache, rows)
  prompt_out = _logprobs(logits_bxCxV, targets_bxC)
  last_bxV = jnp.take_along_axis(logits_bxCxV, last_b[:, None, None],
                                 axis=1)[:, 0]
  first_b = sample.choose_rows(last_bxV, _keys(seed_b, jnp.zeros_like(seed_b)),
                               temperature_b, top_k_b, top_p_b)
  return cache, prompt_out, (first_b, *_logprobs(last_bxV, first_b))


@dataclasses.dataclass(frozen=True)
class Shapes:
  slots: int = 8
  prefill_chunk: int = 64
  prefill_batch: int = 4

  def cache_len(self, max_len: int) -> int:
    """Whole chunks covering max_len: a chunk never runs past the cache."""
    return math.ceil(max_len / self.prefill_chunk) * self.prefill_chunk


class Engine:
  """Runs requests on `params` (any model with init_cache and a per-row
  cache_index: float, int8 serving) in a thread of its own."""

  def __init__(self, graphdef, params, max_len: int, shapes: Shapes,
               context: Callable[[], object] = None):
    """context(): a context manager the engine's thread runs in (the mesh
    and sharding rules the parameters were loaded under)."""
    self.graphdef, self.params = dropless(graphdef, params), params
    self.max_len, self.shapes = max_len, shapes
    self.cache_len = shapes.cache_len(max_len)
    self._context = context
    self._cv = threading.Condition()
    self._waiting: collections.deque[Request] = collections.deque()
    self._slots: list[Request | None] = [None] * shapes.slots
    self._stopping = False
    self._thread: threading.Thread | None = None
    self.steps = collections.Counter()  # prefill / decode steps run.
    self._admissions = 0
    # The exception that ended the loop, if one did: the engine is dead and
    # every later request would be aborted unanswered.
    self.error: BaseException | None = None
    self.compile_seconds: dict[str, float] = {}

  # --- Start and stop -------------------------------------------------------

  def warm_up(self) -> None:
    """Compiles both programs (the only two the server runs) and makes the
    cache; call before start()."""
    with self._entered():
      model = nnx.merge(self.graphdef, self.params)
      self.cache = jax.jit(lambda: model.init_cache(
          self.shapes.slots, self.cache_len))()
      S, b, C = self.shapes.slots, self.shapes.prefill_batch, \
          self.shapes.prefill_chunk
      i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa
      f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa
      decode_args = (i32(S), i32(S), i32(S), i32(S), f32(S), i32(S), f32(S))
      prefill_args = (i32(b), i32(b, C), i32(b), i32(b, C), i32(b), i32(b),
                      f32(b), i32(b), f32(b))
      # Both programs must take and return the cache with one sharding: on
      # a mesh the step's output cache is sharded as its activations (kv
      # heads over `tensor`), and a compiled program refuses an argument
      # sharded otherwise than it was lowered with. Take the decode step's
      # own output sharding, place the cache there, and pin both programs'
      # output cache to it.
      # (On one device there is one sharding: no probe to compile.)
      self._cache_sharding = jax.tree.map(lambda x: x.sharding, self.cache)
      if any(len(x.sharding.device_set) > 1
             for x in jax.tree.leaves(self.params)):
        start = time.monotonic()
        probe = jax.jit(functools.partial(decode_step, self.graphdef)).lower(
            self.params, self.cache, *decode_args).compile()
        self._cache_sharding = probe.output_shardings[0]
        self.cache = jax.device_put(self.cache, self._cache_sharding)
        self.compile_seconds["probe"] = time.monotonic() - start
      self._decode = self._compile("decode", decode_step, *decode_args)
      self._prefill = self._compile("prefill", prefill_step, *prefill_args)

  def _compile(self, name, fn, *args):
    start = time.monotonic()
    sharding = self._cache_sharding

    def pinned(params, cache, *rest):
      cache, *out = fn(self.graphdef, params, cache, *rest)
      return (jax.lax.with_sharding_constraint(cache, sharding), *out)
    compiled = jax.jit(pinned, donate_argnums=(1,)).lower(
        self.params, self.cache, *args).compile()
    self.compile_seconds[name] = time.monotonic() - start
    return compiled

  def _entered(self):
    import contextlib  # noqa: PLC0415
    return self._context() if self._context else contextlib.nullcontext()

  def start(self) -> None:
    self._thread = threading.Thread(target=self._run, name="engine",
                                    daemon=True)
    self._thread.start()

  def stop(self) -> None:
    """Aborts whatever is left and ends the thread."""
    with self._cv:
      self._stopping = True
      self._cv.notify()
    if self._thread:
      self._thread.join()

  def submit(self, request: Request) -> None:
    total = len(request.prompt) + request.max_tokens
    if not 1 <= len(request.prompt) or total > self.max_len:
      raise ValueError(f"prompt + max_tokens = {total} is over {self.max_len}")
    with self._cv:
      if self._stopping:
        request.emit("done", "abort")
        return
      self._waiting.append(request)
      self._cv.notify()

  @property
  def busy(self) -> int:
    """Requests admitted or waiting."""
    return len(self._waiting) + sum(r is not None for r in self._slots)

  # --- The loop -------------------------------------------------------------

  def _run(self) -> None:
    try:
      with self._entered():
        while self._turn():
          pass
    except Exception as e:  # A failed step must not leave clients waiting.
      self.error = e
      log.exception("the engine stopped on an error")
      raise
    finally:
      with self._cv:
        left = [r for r in self._slots if r] + list(self._waiting)
        self._slots = [None] * self.shapes.slots
        self._waiting.clear()
        self._stopping = True
      for r in left:
        r.emit("done", "abort")

  def _turn(self) -> bool:
    """One step boundary: admit, prefill one chunk, decode one token."""
    with self._cv:
      while not (self._stopping or self._waiting or any(self._slots)):
        self._cv.wait()
      if self._stopping:
        return False
      for i, r in enumerate(self._slots):
        if r is None and self._waiting:
          self._slots[i] = self._waiting.popleft()
          self._admissions += 1
          self._slots[i].admitted = self._admissions
    for i, r in enumerate(self._slots):
      if r is not None and r.cancelled:
        self._finish(i, "abort")
    # Oldest first: by slot index, a slot that frees and refills every
    # turn (max_tokens=1, as lm-evaluation-harness asks) would starve the
    # prompts of higher slots for as long as requests keep coming.
    prefilling = sorted((i for i, r in enumerate(self._slots)
                         if r is not None and r.prefilled < len(r.prompt)),
                        key=lambda i: self._slots[i].admitted)
    if prefilling:
      self._prefill_turn(prefilling[:self.shapes.prefill_batch])
    if any(r is not None and r.prefilled == len(r.prompt)
           for r in self._slots):
      self._decode_turn()
    return True

  def _finish(self, slot: int, reason: str) -> None:
    request = self._slots[slot]
    self._slots[slot] = None
    request.emit("done", reason)

  def _settings(self, requests):
    return (np.array([r.seed for r in requests], np.int32),
            np.array([r.temperature for r in requests], np.float32),
            np.array([r.top_k for r in requests], np.int32),
            np.array([r.top_p for r in requests], np.float32))

  def _prefill_turn(self, slots: list[int]) -> None:
    b, C = self.shapes.prefill_batch, self.shapes.prefill_chunk
    pad = self.shapes.slots  # Out of range: a row that writes nothing.
    slot_b = np.full(b, pad, np.int32)
    tokens_bxC = np.zeros((b, C), np.int32)
    targets_bxC = np.zeros((b, C), np.int32)
    start_b = np.zeros(b, np.int32)
    last_b = np.zeros(b, np.int32)
    requests = [self._slots[i] for i in slots]
    for row, (i, r) in enumerate(zip(slots, requests)):
      start, end = r.prefilled, min(r.prefilled + C, len(r.prompt))
      slot_b[row], start_b[row] = i, start
      tokens_bxC[row, :end - start] = r.prompt[start:end]
      nxt = r.prompt[start + 1:end + 1]
      targets_bxC[row, :len(nxt)] = nxt
      last_b[row] = end - start - 1
    settings = self._settings(requests + [requests[0]] * (b - len(requests)))
    self.cache, prompt_out, first_out = self._prefill(
        self.params, self.cache, slot_b, tokens_bxC, start_b, targets_bxC,
        last_b, *settings)
    self.steps["prefill"] += 1
    prompt_out, first_out = jax.device_get((prompt_out, first_out))
    for row, (i, r) in enumerate(zip(slots, requests)):
      start, end = r.prefilled, min(r.prefilled + C, len(r.prompt))
      if r.prompt_logprobs:
        n = len(r.prompt[start + 1:end + 1])
        r.emit("prompt", *(x[row, :n] for x in prompt_out))
      r.prefilled = end
      if end == len(r.prompt):
        self._emit_token(i, *(x[row] for x in first_out))

  def _decode_turn(self) -> None:
    S = self.shapes.slots
    tokens_B = np.zeros(S, np.int32)
    # Idle and still-prefilling rows write where no request reads.
    index_B = np.full(S, self.max_len - 1, np.int32)
    count_B = np.zeros(S, np.int32)
    rows = []
    for i, r in enumerate(self._slots):
      if r is not None and r.prefilled == len(r.prompt):
        tokens_B[i], count_B[i] = r.last_token, r.generated
        index_B[i] = len(r.prompt) + r.generated - 1
        rows.append(i)
    settings = self._settings([r or _IDLE for r in self._slots])
    self.cache, out = self._decode(self.params, self.cache, tokens_B,
                                   index_B, settings[0], count_B,
                                   *settings[1:])
    self.steps["decode"] += 1
    out = jax.device_get(out)
    for i in rows:
      self._emit_token(i, *(x[i] for x in out))

  def _emit_token(self, slot, token, logprob, top_ids, top_logprobs) -> None:
    r = self._slots[slot]
    token = int(token)
    if r.cancelled:
      self._finish(slot, "abort")
      return
    r.generated += 1
    r.last_token = token
    r.emit("token", token, float(logprob), top_ids, top_logprobs)
    if token in r.stop_ids:
      self._finish(slot, "stop")
    elif r.generated == r.max_tokens:
      self._finish(slot, "length")


def dropless(graphdef, params):
  """graphdef with every MoE layer routing without capacity drops.

  An MoE layer routes all the tokens of a step as one group, C slots per
  expert: a row's token loses its expert to tokens of other rows (idle
  rows' filler tokens too), so answers would change with the batch. With
  capacity_factor = experts / top_k, C >= the group's tokens and no
  choice is dropped; the parameters are the same."""
  abstract = nnx.merge(graphdef, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  changed = False
  for _, module in nnx.iter_graph(abstract):
    cfg = getattr(module, "cfg", None)
    if isinstance(cfg, moe.Config) and cfg.experts:
      module.cfg = dataclasses.replace(
          cfg, capacity_factor=max(cfg.capacity_factor,
                                   cfg.experts / cfg.top_k))
      changed = True
  return nnx.graphdef(abstract) if changed else graphdef


_IDLE = Request(prompt=np.zeros(1, np.int32), max_tokens=1,
                emit=lambda *a: None, temperature=0.0)
