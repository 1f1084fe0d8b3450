r"""Serves a run over an OpenAI-compatible HTTP API, with continuous batching.

python scripts/serve.py --workdir=runs/tiny [--port=8000] [--mesh=...] \
    [--slots=8 --prefill_chunk=64 --prefill_batch=4]

Float, int8 serving (scripts/quantize.py), imported Hugging Face and LoRA
runs (read merged). Endpoints: POST /v1/completions, POST
/v1/chat/completions (where the run has a chat template), GET /v1/models,
GET /health. SIGTERM finishes the requests in flight (up to
--drain_seconds) and refuses new ones. See docs/serving.md.
"""
from absl import flags, logging

from lm.checks import UsageError
from lm.run import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free "
                             "one; the startup line says which).")
_MESH = flags.DEFINE_string("mesh", None, "'data,fsdp,tensor' sizes or named "
                            "axes ('fsdp=2,tensor=2'); default: the training "
                            "mesh if it fits, else FSDP.")
_NAME = flags.DEFINE_string("model_name", None, "The model's id in the API "
                            "(default: the run directory's name).")
_SLOTS = flags.DEFINE_integer("slots", 8, "Requests decoded together (KV "
                              "cache rows).")
_CHUNK = flags.DEFINE_integer("prefill_chunk", 64, "Prompt tokens per "
                              "prefill step and request.")
_PREFILL_BATCH = flags.DEFINE_integer("prefill_batch", 4, "Prompts "
                                      "prefilled together.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens_limit", None, "Most tokens a "
                                   "request may ask for (default: the "
                                   "model's window).")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_tokens", None, "Longest "
                                   "prompt accepted (default: the window "
                                   "less one).")
_DRAIN = flags.DEFINE_float("drain_seconds", 30.0, "On SIGTERM, how long "
                            "requests in flight may still run.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import contextlib  # noqa: PLC0415
  import dataclasses  # noqa: PLC0415
  import signal  # noqa: PLC0415
  import threading  # noqa: PLC0415
  from pathlib import Path  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import uvicorn  # noqa: PLC0415

  from lm.data import tokenizer as tokenizer_lib  # noqa: PLC0415
  from lm.parallel import rules as rules_lib  # noqa: PLC0415
  from lm.quant import serving  # noqa: PLC0415
  from lm.run import restore  # noqa: PLC0415
  from lm.serve import api, chat, engine as engine_lib  # noqa: PLC0415

  config = restore.load_config(_WORKDIR.value)
  if config.task not in ("lm", "sft"):
    raise UsageError(
        f"{_WORKDIR.value} holds a config.task={config.task!r} run; "
        "serve.py serves language models (scripts/export.py exports "
        "classifiers).")
  for flag in (_SLOTS, _CHUNK, _PREFILL_BATCH):
    if flag.value < 1:
      raise UsageError(f"--{flag.name}={flag.value} must be at least 1.")
  max_len = config.model.max_len
  limits = api.Limits(max_len=max_len,
                      max_tokens=_MAX_TOKENS.value or max_len,
                      max_prompt_tokens=_MAX_PROMPT.value or max_len - 1)
  tok = tokenizer_lib.get(config.data.tokenizer)
  render, why = chat.renderer(config, tok)
  # The slots' batch is replicated, the parameters sharded as in training
  # (as generate.py).
  rules = dataclasses.replace(rules_lib.Rules(), batch=None)
  with rules_lib.use(rules):
    loaded = restore.load(_WORKDIR.value, _MESH.value)
  mesh = loaded.setup.mesh

  @contextlib.contextmanager
  def context():
    with rules_lib.use(rules), jax.set_mesh(mesh):
      yield

  shapes = engine_lib.Shapes(slots=_SLOTS.value, prefill_chunk=_CHUNK.value,
                             prefill_batch=_PREFILL_BATCH.value)
  engine = engine_lib.Engine(loaded.setup.graphdef, loaded.params, max_len,
                             shapes, context)
  engine.warm_up()
  served = api.Served(engine=engine, tokenizer=tok,
                      model_name=_NAME.value or Path(_WORKDIR.value).name,
                      limits=limits, chat=render, chat_why=why)
  app = api.make_app(served)

  class Server(uvicorn.Server):
    async def startup(self, sockets=None):
      await super().startup(sockets)
      port = self.servers[0].sockets[0].getsockname()[1]
      kind = " (int8 serving model)" if "serving" in config else ""
      print(f"serving {served.model_name} (step {loaded.step}{kind}, mesh "
            f"{dict(mesh.shape)}) on http://{_HOST.value}:{port}/v1; "
            f"{shapes.slots} slots, prefill {shapes.prefill_batch} x "
            f"{shapes.prefill_chunk} tokens; compiled in "
            f"{sum(engine.compile_seconds.values()):.1f} s; chat "
            f"{'on' if render else 'off: ' + why}", flush=True)

    @contextlib.contextmanager
    def capture_signals(self):
      # uvicorn re-raises a caught SIGTERM once it has shut down, killing
      # the process before the engine stops and the summary prints; a
      # drained server exits 0 instead.
      with super().capture_signals():
        try:
          yield
        finally:
          self._captured_signals.clear()

    def handle_exit(self, sig, frame):
      if not served.draining:
        served.draining = True  # New requests get 503 from now on.
        # At the deadline the engine aborts what is left, so each client
        # gets an answer (a 503, or a stream's last chunk) before uvicorn
        # cancels the handlers (a bare 500 and a traceback each).
        stopper = threading.Timer(_DRAIN.value, engine.stop)
        stopper.daemon = True
        stopper.start()
        busy = engine.busy
        print(f"{signal.Signals(sig).name}: finishing {busy} "
              f"request{'s' if busy != 1 else ''} in flight (up to "
              f"{_DRAIN.value:g} s), refusing new ones", flush=True)
      super().handle_exit(sig, frame)

  server = Server(uvicorn.Config(
      app, host=_HOST.value, port=_PORT.value, log_level="warning",
      timeout_graceful_shutdown=_DRAIN.value + 5))
  engine.start()
  try:
    server.run()
  finally:
    engine.stop()
  print(f"stopped after {engine.steps['decode']} decode and "
        f"{engine.steps['prefill']} prefill steps; params "
        f"{serving.params_bytes(loaded.params):,} bytes", flush=True)


if __name__ == "__main__":
  cli.run(main)
