"""The OpenAI-compatible HTTP API over an Engine (FastAPI).

  POST /v1/completions       prompt (text, token ids, or a list of either:
                             one choice each), max_tokens, temperature,
                             top_p, top_k, stop, seed, n=1, stream,
                             logprobs (0..5), echo
  POST /v1/chat/completions  messages, rendered by the run's chat template
  GET  /v1/models, GET /health

Choices follow vLLM where OpenAI leaves room: top_k is accepted (0 or -1:
all), logprobs are the model's (before temperature and filtering), the
end-of-text token ends a choice without appearing in it, an unknown field
is refused (OpenAI's behaviour; vLLM ignores it). Every refusal is a 4xx
with OpenAI's error body {"error": {"message", "type", "param", "code"}},
sent before the request reaches the engine.

Text is released as tokens arrive, holding back what could still change:
an incomplete UTF-8 character, or the start of a stop string.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Literal

import numpy as np
import pydantic
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lm.serve import engine as engine_lib

MAX_STOPS = 4  # As OpenAI.
# A few prompt tokens decoded before the generated ones: a continuation
# decoded alone can lose a leading space (SentencePiece).
_CONTEXT_TOKENS = 4


class ApiError(Exception):

  def __init__(self, status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error", code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param = status, message, param
    self.kind, self.code = kind, code


def _error_body(status: int, message: str, param=None,
                kind="invalid_request_error", code=None) -> JSONResponse:
  return JSONResponse(status_code=status, content={"error": {
      "message": message, "type": kind, "param": param, "code": code}})


# --- Request bodies ----------------------------------------------------------


class _Body(pydantic.BaseModel):
  # strict: "3", true or 2.0 for an int (or "yes" for a bool) is a wrong
  # type, refused, as docs/serving.md says; an int for a float is fine.
  model_config = pydantic.ConfigDict(extra="forbid", strict=True)
  model: str | None = None
  max_tokens: int | None = None
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = -1
  stop: str | list[str] | None = None
  seed: int | None = None
  n: int = 1
  stream: bool = False
  stream_options: dict | None = None
  # Accepted at their neutral values only (refused otherwise).
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict | None = None
  user: str | None = None


class CompletionBody(_Body):
  prompt: str | list[int] | list[str] | list[list[int]]
  logprobs: int | None = None
  echo: bool = False
  best_of: int | None = None
  suffix: str | None = None


class Message(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="allow", strict=True)
  role: Literal["system", "user", "assistant"]
  content: str | list[dict]


class ChatBody(_Body):
  messages: list[Message]
  max_completion_tokens: int | None = None
  logprobs: bool = False
  top_logprobs: int | None = None


# --- What a request asks the engine for ---------------------------------------


@dataclasses.dataclass
class Limits:
  max_len: int  # The model's window: prompt + max_tokens <= max_len.
  max_tokens: int  # The server's cap on max_tokens.
  max_prompt_tokens: int  # The server's cap on a prompt.


@dataclasses.dataclass
class Sampling:
  max_tokens: int
  temperature: float
  top_k: int
  top_p: float
  seed: int
  stops: tuple[str, ...]
  logprobs: int | None  # Alternatives per token, or None: no logprobs.


def _sampling(body: _Body, max_tokens: int | None, logprobs: int | None,
              default_tokens: int, limits: Limits) -> Sampling:
  if body.n != 1:
    raise ApiError(400, f"n={body.n}: this server returns one choice per "
                   "prompt (n=1).", "n")
  if body.temperature < 0:
    raise ApiError(400, f"temperature={body.temperature} is below 0; use 0 "
                   "(greedy) or more.", "temperature")
  if not 0 < body.top_p <= 1:
    raise ApiError(400, f"top_p={body.top_p} must be in (0, 1].", "top_p")
  if body.top_k < -1:
    raise ApiError(400, f"top_k={body.top_k}: use -1 or 0 (all tokens) or "
                   "a positive count.", "top_k")
  for name in ("presence_penalty", "frequency_penalty"):
    if getattr(body, name):
      raise ApiError(400, f"{name} is not supported; leave it at 0.", name)
  if body.logit_bias:
    raise ApiError(400, "logit_bias is not supported.", "logit_bias")
  if max_tokens is None:
    max_tokens = default_tokens
  if max_tokens <= 0:
    raise ApiError(400, f"max_tokens={max_tokens} must be at least 1.",
                   "max_tokens")
  if max_tokens > limits.max_tokens:
    raise ApiError(400, f"max_tokens={max_tokens} is above this server's "
                   f"limit of {limits.max_tokens} (--max_tokens_limit).",
                   "max_tokens")
  if logprobs is not None and not 0 <= logprobs <= engine_lib.TOP:
    raise ApiError(400, f"logprobs={logprobs} must be between 0 and "
                   f"{engine_lib.TOP}.", "logprobs")
  stops = ((body.stop,) if isinstance(body.stop, str)
           else tuple(body.stop or ()))
  if len(stops) > MAX_STOPS or not all(stops):
    raise ApiError(400, f"stop: give at most {MAX_STOPS} non-empty "
                   "strings.", "stop")
  seed = (int.from_bytes(os.urandom(4), "little") if body.seed is None
          else body.seed) % 2**31
  return Sampling(max_tokens=max_tokens, temperature=body.temperature,
                  # filter_rows reads k >= V as all; an int32 either way
                  # (a larger one would kill the engine's thread).
                  top_k=min(max(body.top_k, 0), 2**31 - 1), top_p=body.top_p,
                  seed=seed,
                  stops=stops, logprobs=logprobs)


# --- Turning engine events into text -------------------------------------------


@dataclasses.dataclass
class Token:
  id: int
  logprob: float
  top: list[tuple[int, float]]


@dataclasses.dataclass
class Piece:
  """What one generation step releases: new text, the tokens behind it,
  and at the end the finish reason."""
  text: str = ""
  tokens: list[Token] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None


class _Detokenizer:
  """Generated ids -> released text, stop strings applied."""

  def __init__(self, tok, prompt: np.ndarray, stops: tuple[str, ...]):
    self.tok, self.stops = tok, stops
    self.context = [int(i) for i in prompt[-_CONTEXT_TOKENS:]]
    self.base = tok.decode(self.context)
    self.ids: list[int] = []
    self.released = 0  # Characters of the generated text released.
    self.hold = max((len(s) for s in stops), default=1) - 1

  def text(self) -> str:
    full = self.tok.decode(self.context + self.ids)
    return (full[len(self.base):] if full.startswith(self.base)
            else self.tok.decode(self.ids))

  def add(self, token: int) -> tuple[str, bool]:
    """(newly released text, whether a stop string ended the choice)."""
    self.ids.append(token)
    text = self.text()
    for stop in self.stops:
      at = text.find(stop, max(0, self.released - len(stop) + 1))
      if at >= 0:
        return self._release(text[:at]), True
    end = len(text)
    while end > self.released and text[end - 1] == "\ufffd":
      end -= 1  # An incomplete UTF-8 character may still complete.
    # Then hold back what could start a stop string: counted before the
    # incomplete character, which is not text yet (the stop "€é" after a
    # complete "€" and half an "é" must not release the "€").
    end -= self.hold
    return self._release(text[:max(end, self.released)]), False

  def flush(self) -> str:
    return self._release(self.text())

  def _release(self, upto: str) -> str:
    new = upto[self.released:]
    self.released = len(upto)
    return new


class _Events:
  """Engine events (from its thread) into an asyncio queue."""

  def __init__(self):
    self.loop = asyncio.get_running_loop()
    self.queue: asyncio.Queue = asyncio.Queue()

  def emit(self, *event) -> None:
    try:
      self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
    except RuntimeError:  # The loop closed (shutdown): nobody listens.
      pass


# --- The application ----------------------------------------------------------


@dataclasses.dataclass
class Served:
  """Everything the API needs: the engine and how to talk to it."""
  engine: engine_lib.Engine
  tokenizer: object
  model_name: str
  limits: Limits
  # messages (list of {"role", "content"}) -> prompt text, or None: the
  # run has no chat template.
  chat: Callable[[list[dict]], str] | None = None
  chat_why: str = ""
  draining: bool = False
  # Choices ended, by finish reason ("length", "stop", "abort": the client
  # went away or the server stopped), for /health.
  finished: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def make_app(served: Served) -> FastAPI:
  app = FastAPI(title="lm", docs_url=None, redoc_url=None)
  tok = served.tokenizer

  @app.exception_handler(ApiError)
  async def _api_error(request, exc: ApiError):
    return _error_body(exc.status, exc.message, exc.param, exc.kind, exc.code)


  @app.exception_handler(HTTPException)
  async def _http(request, exc: HTTPException):
    return _error_body(exc.status_code, str(exc.detail),
                       kind="not_found_error" if exc.status_code == 404
                       else "invalid_request_error")

  @app.middleware("http")
  async def _refuse_while_draining(request: HttpRequest, call_next):
    if served.draining and request.url.path != "/health":
      return _error_body(503, "the server is shutting down; retry on "
                         "another replica.", kind="service_unavailable")
    return await call_next(request)

  @app.get("/health")
  async def health():
    if served.draining:
      return JSONResponse(status_code=503, content={"status": "draining"})
    if served.engine.error is not None:
      return JSONResponse(status_code=503, content={
          "status": "error", "error": repr(served.engine.error)})
    return {"status": "ok", "busy": served.engine.busy,
            "finished": dict(served.finished)}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{
        "id": served.model_name, "object": "model",
        "created": served.created, "owned_by": "lm",
        "max_model_len": served.limits.max_len}]}

  async def parse(request: HttpRequest, cls):
    """The JSON body as `cls`, whatever the Content-Type said."""
    try:
      data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
      raise ApiError(400, "the request body is not valid JSON.") from None
    if not isinstance(data, dict):
      raise ApiError(400, "the request body must be a JSON object.")
    try:
      return cls.model_validate(data)
    except pydantic.ValidationError as e:
      first = e.errors()[0]
      where = ".".join(str(p) for p in first["loc"]) or None
      message = ("unknown field; the fields are listed in docs/serving.md"
                 if first["type"] == "extra_forbidden" else first["msg"])
      raise ApiError(400, f"{where}: {message}", where) from None

  def check_model(body: _Body) -> None:
    if body.model not in (None, served.model_name):
      raise ApiError(404, f"The model {body.model!r} does not exist; this "
                     f"server serves {served.model_name!r}.", "model",
                     kind="not_found_error", code="model_not_found")

  def encode(prompt) -> np.ndarray:
    if not isinstance(prompt, str) and not all(
        0 <= i < tok.vocab_size for i in prompt):
      raise ApiError(400, f"the prompt holds token ids outside [0, "
                     f"{tok.vocab_size}).", "prompt")
    ids = (tok.encode(prompt) if isinstance(prompt, str)
           else np.asarray(prompt, np.int64))
    if not ids.size:
      raise ApiError(400, "the prompt is empty.", "prompt")
    return ids.astype(np.int32)

  def check_length(ids: np.ndarray, sampling: Sampling) -> None:
    limits = served.limits
    if len(ids) > limits.max_prompt_tokens:
      raise ApiError(400, f"the prompt has {len(ids)} tokens, above this "
                     f"server's limit of {limits.max_prompt_tokens} "
                     "(--max_prompt_tokens).", "prompt")
    if len(ids) + sampling.max_tokens > limits.max_len:
      raise ApiError(400, f"This model's maximum context length is "
                     f"{limits.max_len} tokens. However, you requested "
                     f"{len(ids) + sampling.max_tokens} tokens "
                     f"({len(ids)} in the prompt, {sampling.max_tokens} "
                     "for the completion). Please reduce the prompt or "
                     "max_tokens.", "max_tokens" if len(ids) < limits.max_len
                     else "prompt", code="context_length_exceeded")

  async def run(ids: np.ndarray, sampling: Sampling, echo: bool
                ) -> AsyncIterator[Piece | tuple]:
    """Pieces of one choice; first, with echo and logprobs, a
    ("prompt", [Token | None per prompt token]) item."""
    events = _Events()
    request = engine_lib.Request(
        prompt=ids, max_tokens=sampling.max_tokens, emit=events.emit,
        temperature=sampling.temperature, top_k=sampling.top_k,
        top_p=sampling.top_p, seed=sampling.seed,
        stop_ids=(tok.eos_id,),
        prompt_logprobs=echo and sampling.logprobs is not None)
    detok = _Detokenizer(tok, ids, sampling.stops)
    prompt_tokens: list[Token | None] = [None]
    check_engine()
    served.engine.submit(request)
    finished = None  # The finish reason, once known.
    try:
      while True:
        kind, *args = await events.queue.get()
        if kind == "prompt":
          prompt_tokens += [Token(int(t), float(lp), _top(ti, tl))
                            for t, lp, ti, tl in zip(
                                ids[len(prompt_tokens):], *args)]
          if len(prompt_tokens) == len(ids):
            yield ("prompt", prompt_tokens)
        elif kind == "token":
          token_id, lp, top_ids, top_lps = args
          text, stopped = detok.add(token_id)
          piece = Piece(text, [Token(token_id, lp, _top(top_ids, top_lps))])
          if stopped:  # A stop string: the engine need not go on.
            request.cancel()
            finished = piece.finish_reason = "stop"
            yield piece
            return
          yield piece
        else:
          finished = args[0]
          yield Piece(detok.flush(), finish_reason=finished)
          return
    finally:
      if finished is None:
        request.cancel()  # The client went away: free the slot.
      served.finished[finished or "abort"] += 1

  def check_engine() -> None:
    if served.engine.error is not None:
      raise ApiError(503, f"the model engine stopped on an error "
                     f"({served.engine.error!r}); restart the server.",
                     kind="server_error")

  def _top(ids, lps) -> list[tuple[int, float]]:
    return [(int(i), float(lp)) for i, lp in zip(ids, lps)]

  def token_text(i: int) -> str:
    return tok.decode([i])

  def completion_logprobs(tokens: list[Token | None], k: int,
                          offset: int, ids: list[int]) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
           "text_offset": []}
    for i, t in zip(ids, tokens):
      text = token_text(i)
      out["tokens"].append(text)
      out["text_offset"].append(offset)
      offset += len(text)
      out["token_logprobs"].append(None if t is None else t.logprob)
      top = None
      if t is not None:
        top = {}
        for j, lp in t.top[:k]:  # Most likely first: keep it on a clash.
          top.setdefault(token_text(j), lp)
      out["top_logprobs"].append(top)
    return out

  def chat_logprobs(tokens: list[Token], k: int) -> dict:
    def entry(i, lp):
      text = token_text(i)
      return {"token": text, "logprob": lp,
              "bytes": list(text.encode("utf-8"))}
    return {"content": [dict(entry(t.id, t.logprob), top_logprobs=[
        entry(j, lp) for j, lp in t.top[:k]]) for t in tokens]}

  def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

  async def merged(streams):
    """(index, item) from several async iterators as they come."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index, stream):
      try:
        async for item in stream:
          await queue.put((index, item))
      finally:
        await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
      left = len(tasks)
      while left:
        index, item = await queue.get()
        if item is done:
          left -= 1
        else:
          yield index, item
    finally:
      for t in tasks:
        t.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)

  async def until_gone(http_request: HttpRequest, consume):
    """Awaits consume(), cancelling it (and so its engine requests) if the
    client disconnects first; None then."""
    async def gone():
      # The body is read: the next message is the disconnect. (Request.
      # is_disconnected's non-blocking poll never sees it through
      # BaseHTTPMiddleware's receive wrapper.)
      while (await http_request.receive())["type"] != "http.disconnect":
        pass
    task = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(gone())
    try:
      await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      watch.cancel()
      if not task.done():
        task.cancel()
      await asyncio.gather(task, watch, return_exceptions=True)
    return task.result() if not task.cancelled() else None

  def aborted() -> ApiError:
    return ApiError(503, "the server stopped before this request finished; "
                    "retry.", kind="server_error")

  def sse(gen) -> StreamingResponse:
    async def body():
      async for chunk in gen:
        yield f"data: {json.dumps(chunk)}\n\n"
      yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")

  @app.post("/v1/completions")
  async def completions(request: HttpRequest):
    body = await parse(request, CompletionBody)
    check_model(body)
    if body.best_of not in (None, 1):
      raise ApiError(400, "best_of is not supported.", "best_of")
    if body.suffix:
      raise ApiError(400, "suffix is not supported.", "suffix")
    sampling = _sampling(body, body.max_tokens, body.logprobs, 16,
                         served.limits)
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
      prompts = [prompts]
    if not prompts:
      raise ApiError(400, "the prompt is empty.", "prompt")
    ids_list = [encode(p) for p in prompts]
    for ids in ids_list:
      check_length(ids, sampling)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    k = sampling.logprobs

    def head(choices):
      return {"id": rid, "object": "text_completion", "created": created,
              "model": served.model_name, "choices": choices}

    streams = [run(ids, sampling, body.echo) for ids in ids_list]
    if body.stream:
      async def chunks():
        counts = [0] * len(ids_list)
        offsets = [0] * len(ids_list)
        async for i, item in merged(streams):
          ids = ids_list[i]
          if isinstance(item, tuple):  # Echoed prompt with its logprobs.
            text = tok.decode(ids)
            lp = completion_logprobs(item[1], k, 0, ids.tolist())
            offsets[i] = len(text)
            yield head([{"index": i, "text": text, "logprobs": lp,
                         "finish_reason": None}])
            continue
          if body.echo and k is None and counts[i] == 0 and not offsets[i]:
            offsets[i] = len(tok.decode(ids))
            yield head([{"index": i, "text": tok.decode(ids),
                         "logprobs": None, "finish_reason": None}])
          counts[i] += len(item.tokens)
          lp = None
          if k is not None:
            lp = completion_logprobs(item.tokens, k, offsets[i],
                                     [t.id for t in item.tokens])
          offsets[i] += len(item.text)
          if item.text or item.finish_reason or lp:
            yield head([{"index": i, "text": item.text, "logprobs": lp,
                         "finish_reason": item.finish_reason}])
        if (body.stream_options or {}).get("include_usage"):
          yield dict(head([]), usage=usage(sum(map(len, ids_list)),
                                           sum(counts)))
      return sse(chunks())

    results = [dict(text="", tokens=[], prompt=None, finish=None)
               for _ in ids_list]

    async def consume():
      async for i, item in merged(streams):
        if isinstance(item, tuple):
          results[i]["prompt"] = item[1]
        else:
          results[i]["text"] += item.text
          results[i]["tokens"] += item.tokens
          results[i]["finish"] = item.finish_reason or results[i]["finish"]
      return True
    if not await until_gone(request, consume):
      return Response(status_code=499)  # Nobody reads it.
    if any(r["finish"] == "abort" for r in results):
      raise aborted()
    choices = []
    for i, (ids, r) in enumerate(zip(ids_list, results)):
      prefix = tok.decode(ids) if body.echo else ""
      lp = None
      if k is not None:
        gen_ids = [t.id for t in r["tokens"]]
        lp = completion_logprobs(r["tokens"], k, len(prefix), gen_ids)
        if body.echo:
          echoed = completion_logprobs(r["prompt"], k, 0, ids.tolist())
          lp = {key: echoed[key] + lp[key] for key in lp}
      choices.append({"index": i, "text": prefix + r["text"],
                      "logprobs": lp, "finish_reason": r["finish"]})
    return dict(head(choices), usage=usage(
        sum(map(len, ids_list)), sum(len(r["tokens"]) for r in results)))

  @app.post("/v1/chat/completions")
  async def chat(request: HttpRequest):
    body = await parse(request, ChatBody)
    check_model(body)
    if served.chat is None:
      raise ApiError(400, f"this model has no chat template ({served.chat_why}"
                     "); use /v1/completions.", "messages")
    if not body.messages:
      raise ApiError(400, "messages is empty.", "messages")
    messages = [{"role": m.role, "content": m.content if isinstance(
        m.content, str) else "".join(p.get("text", "") for p in m.content)}
                for m in body.messages]
    try:
      prompt = served.chat(messages)
    except Exception as e:  # noqa: BLE001 - raise_exception, or Jinja's
      # own errors (a missing key): these messages, not the server.
      raise ApiError(400, f"the chat template failed on these messages: "
                     f"{e}", "messages") from None
    ids = encode(prompt)
    k = (body.top_logprobs or 0) if body.logprobs else None
    room = served.limits.max_len - len(ids)
    sampling = _sampling(
        body, body.max_tokens if body.max_completion_tokens is None
        else body.max_completion_tokens, k,
        max(1, min(room, served.limits.max_tokens)), served.limits)
    check_length(ids, sampling)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def head(choices, obj):
      return {"id": rid, "object": obj, "created": created,
              "model": served.model_name, "choices": choices}

    stream = run(ids, sampling, echo=False)
    if body.stream:
      async def chunks():
        count = 0
        yield head([{"index": 0, "delta": {"role": "assistant",
                                           "content": ""},
                     "logprobs": None, "finish_reason": None}],
                   "chat.completion.chunk")
        async for piece in stream:
          count += len(piece.tokens)
          lp = chat_logprobs(piece.tokens, k) if k is not None else None
          delta = {"content": piece.text} if piece.text else {}
          if delta or piece.finish_reason or (lp and lp["content"]):
            yield head([{"index": 0, "delta": delta, "logprobs": lp,
                         "finish_reason": piece.finish_reason}],
                       "chat.completion.chunk")
        if (body.stream_options or {}).get("include_usage"):
          yield dict(head([], "chat.completion.chunk"),
                     usage=usage(len(ids), count))
      return sse(chunks())
    text, tokens, finish = "", [], None

    async def consume():
      nonlocal text, tokens, finish
      async for piece in stream:
        text += piece.text
        tokens += piece.tokens
        finish = piece.finish_reason or finish
      return True
    if not await until_gone(request, consume):
      return Response(status_code=499)  # Nobody reads it.
    if finish == "abort":
      raise aborted()
    return dict(head([{
        "index": 0, "message": {"role": "assistant", "content": text},
        "logprobs": chat_logprobs(tokens, k) if k is not None else None,
        "finish_reason": finish}], "chat.completion"),
                usage=usage(len(ids), len(tokens)))

  return app
