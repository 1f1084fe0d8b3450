"""Continuous batching: every request's tokens equal what lm/sample.py's
generate (one prompt, its own program) gives, whatever else shares the
batch, for float and int8 serving models; a cancelled request frees its
slot; the per-row sampler keeps the tokens the one-setting filter keeps."""
import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import sample
from lm.models import transformer
from lm.parallel import rules as rules_lib
from lm.quant import serving
from lm.serve import engine as engine_lib

CFG = transformer.Config(vocab_size=64, max_len=40, d_model=32, n_layers=2,
                         n_heads=4, n_kv_heads=2, d_ff=64)
# Small shapes that exercise the scheduling: prompts longer than a chunk
# (several prefill steps), more requests than slots (a queue), a prefill
# batch with padding rows.
SHAPES = engine_lib.Shapes(slots=3, prefill_chunk=8, prefill_batch=2)


def _run_all(engine, requests):
  """Submits every request at once; {index: (tokens, finish reason)}."""
  out, done = {}, threading.Semaphore(0)

  def emitter(i):
    out[i] = ([], None)

    def emit(kind, *args):
      if kind == "token":
        out[i][0].append(int(args[0]))
      elif kind == "done":
        out[i] = (out[i][0], args[0])
        done.release()
    return emit
  for i, r in enumerate(requests):
    r.emit = emitter(i)
    engine.submit(r)
  for _ in requests:
    assert done.acquire(timeout=120)
  return out


def _prompts(n, vocab, seed=0):
  """n prompts of three lengths: one chunk, two, three (the reference
  compiles once per length)."""
  rng = np.random.default_rng(seed)
  return [rng.integers(1, vocab, (3, 11, 19)[i % 3]).astype(np.int32)
          for i in range(n)]


@functools.lru_cache(maxsize=None)
def _generate(graphdef, n, temperature):
  return jax.jit(functools.partial(sample.generate, graphdef,
                                   max_new_tokens=n, temperature=temperature))


def _reference(graphdef, params, prompt, n, temperature=0.0):
  return list(np.asarray(_generate(graphdef, n, temperature)(
      params, jnp.asarray(prompt)[None], jax.random.key(0))[0]))


def test_batched_greedy_equals_one_prompt_generate():
  model = transformer.Model(CFG, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  engine = engine_lib.Engine(graphdef, params, CFG.max_len, SHAPES)
  engine.warm_up()
  engine.start()
  try:
    prompts = _prompts(7, CFG.vocab_size)
    out = _run_all(engine, [engine_lib.Request(
        prompt=p, max_tokens=12, emit=None, temperature=0.0)
                            for p in prompts])
    for i, p in enumerate(prompts):
      assert out[i] == (_reference(graphdef, params, p, 12,
                                   temperature=0.0), "length"), i
    assert engine.steps["prefill"] >= 4  # Chunked and queued.
    # Sampled: each request's draws depend on its seed only, not on the
    # batch (alone == together), and differ across seeds.
    sampled = [engine_lib.Request(prompt=prompts[i % 2], max_tokens=10,
                                  emit=None, temperature=1.0, top_k=20,
                                  seed=i) for i in range(4)]
    together = _run_all(engine, sampled)
    alone = {i: _run_all(engine, [engine_lib.Request(
        prompt=r.prompt, max_tokens=10, emit=None, temperature=1.0,
        top_k=20, seed=i)])[0] for i, r in enumerate(sampled)}
    assert together == alone
    assert together[0] != together[2]  # Same prompt, other seed.
    # An end-of-text id stops a request (emitted, for its logprob).
    first = out[0][0][0]
    stopped = _run_all(engine, [engine_lib.Request(
        prompt=prompts[0], max_tokens=12, emit=None, temperature=0.0,
        stop_ids=(first,))])
    assert stopped[0] == ([first], "stop")
  finally:
    engine.stop()


def test_int8_serving_model_batched_equals_generate(tmp_path):
  """The engine runs what restore.load gives, here an int8 serving model
  (int8 kernels + scales) on a mesh with the rules table, as serve.py."""
  import contextlib  # noqa: PLC0415

  from conftest import init_run  # noqa: PLC0415
  from lm.run import restore  # noqa: PLC0415
  rules = dataclasses.replace(rules_lib.Rules(), batch=None)
  with rules_lib.use(rules):
    loaded = restore.load(init_run(tmp_path), "1,2,1")
  mesh = loaded.setup.mesh
  config = serving.serving_config(loaded.config)

  @contextlib.contextmanager
  def context():
    with rules_lib.use(rules), jax.set_mesh(mesh):
      yield
  with context():
    params = serving.convert(loaded.params, config)
    model = serving.setup_for(config, mesh)
  assert any(x.dtype == jnp.int8 for x in jax.tree.leaves(params))
  max_len = config.model.max_len
  engine = engine_lib.Engine(model.graphdef, params, max_len, SHAPES, context)
  engine.warm_up()
  engine.start()
  try:
    prompts = _prompts(4, config.model.vocab_size, seed=1)
    out = _run_all(engine, [engine_lib.Request(
        prompt=p, max_tokens=8, emit=None, temperature=0.0) for p in prompts])
  finally:
    engine.stop()
  with context():
    for i, p in enumerate(prompts):
      assert out[i] == (_reference(model.graphdef, params, p, 8,
                                   temperature=0.0), "length"), i


def test_both_programs_write_the_cache_in_place():
  """The engine donates its cache to both programs, and each writes the
  per-layer cache in place: every cache output aliases its input, and the
  scratch memory stays under the cache's size (under half for decode;
  prefill also gathers its prefill_batch rows). Restacking a stacked
  cache, or an undonated one, would copy it whole every step."""
  cfg = dataclasses.replace(CFG, max_len=256, n_layers=4)
  graphdef, params = nnx.split(transformer.Model(cfg, nnx.Rngs(0)))
  engine = engine_lib.Engine(graphdef, nnx.to_pure_dict(params), cfg.max_len,
                             engine_lib.Shapes(slots=8, prefill_chunk=16,
                                               prefill_batch=2))
  engine.warm_up()
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.cache))
  for program, most in ((engine._decode, cache_bytes / 2),
                        (engine._prefill, cache_bytes)):
    memory = program.memory_analysis()
    assert memory.alias_size_in_bytes == cache_bytes
    assert memory.temp_size_in_bytes < most, memory


def test_a_cancelled_request_frees_its_slot():
  model = transformer.Model(CFG, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  engine = engine_lib.Engine(graphdef, nnx.to_pure_dict(params), CFG.max_len,
                             engine_lib.Shapes(slots=1, prefill_chunk=8,
                                               prefill_batch=1))
  engine.warm_up()
  engine.start()
  try:
    got, started, done = [], threading.Event(), threading.Event()

    def emit(kind, *args):
      got.append((kind, args[0]))
      if kind == "token":
        started.set()
      if kind == "done":
        done.set()
    long = engine_lib.Request(prompt=np.ones(3, np.int32), max_tokens=30,
                              emit=emit, temperature=0.0)
    engine.submit(long)
    assert started.wait(60)
    long.cancel()
    assert done.wait(60)
    assert got[-1] == ("done", "abort")
    assert len(got) < 30  # It stopped early.
    # The one slot is free again: the next request runs to its end.
    out = _run_all(engine, [engine_lib.Request(
        prompt=np.ones(2, np.int32), max_tokens=3, emit=None,
        temperature=0.0)])
    assert out[0][1] == "length" and engine.busy == 0
  finally:
    engine.stop()


def test_per_row_filter_keeps_what_the_single_filter_keeps():
  logits = jax.random.normal(jax.random.key(0), (6, 50))
  settings = [(0, 1.0), (5, 1.0), (0, 0.5), (5, 0.3), (1, 1.0), (50, 0.99)]
  rows = sample.filter_rows(logits, jnp.array([k for k, _ in settings]),
                            jnp.array([p for _, p in settings]))
  for i, (k, p) in enumerate(settings):
    want = sample.filter_logits(logits[i:i + 1], top_k=k, top_p=p)
    np.testing.assert_array_equal(rows[i:i + 1] > -1e30, want > -1e30)


def test_a_tensor_parallel_engine_equals_generate(tmp_path):
  """On a mesh that splits the kv heads (tensor=2), the steps' output
  cache is sharded: both compiled programs must take it back as they left
  it (it was refused at the first decode step)."""
  import contextlib  # noqa: PLC0415

  from conftest import init_run  # noqa: PLC0415
  from lm.run import restore  # noqa: PLC0415
  rules = dataclasses.replace(rules_lib.Rules(), batch=None)
  with rules_lib.use(rules):
    loaded = restore.load(init_run(tmp_path), "1,2,2")
  mesh = loaded.setup.mesh

  @contextlib.contextmanager
  def context():
    with rules_lib.use(rules), jax.set_mesh(mesh):
      yield
  engine = engine_lib.Engine(loaded.setup.graphdef, loaded.params,
                             loaded.config.model.max_len, SHAPES, context)
  engine.warm_up()
  engine.start()
  try:
    prompts = _prompts(4, loaded.config.model.vocab_size, seed=2)
    out = _run_all(engine, [engine_lib.Request(
        prompt=p, max_tokens=8, emit=None, temperature=0.0) for p in prompts])
  finally:
    engine.stop()
  assert engine.error is None
  with context():
    for i, p in enumerate(prompts):
      assert out[i] == (_reference(loaded.setup.graphdef, loaded.params, p,
                                   8, temperature=0.0), "length"), i


def test_prefill_serves_the_oldest_prompt_first():
  """One-token requests (lm-evaluation-harness's log-likelihoods) free and
  refill the low slots every turn: prompts in higher slots must not wait
  for the queue to empty."""
  model = transformer.Model(CFG, nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  engine = engine_lib.Engine(graphdef, nnx.to_pure_dict(params), CFG.max_len,
                             engine_lib.Shapes(slots=4, prefill_chunk=8,
                                               prefill_batch=2))
  engine.warm_up()
  order = []
  done = threading.Semaphore(0)

  def emitter(i):
    def emit(kind, *args):
      if kind == "done":
        order.append(i)
        done.release()
    return emit
  n = 16
  for i in range(n):  # Queued before the loop starts: a fixed admission.
    engine.submit(engine_lib.Request(prompt=np.ones(5, np.int32),
                                     max_tokens=1, emit=emitter(i),
                                     temperature=0.0))
  engine.start()
  try:
    for _ in range(n):
      assert done.acquire(timeout=60)
  finally:
    engine.stop()
  # Each prefill step finishes the two oldest.
  assert [sorted(order[j:j + 2]) for j in range(0, n, 2)] == [
      [j, j + 1] for j in range(0, n, 2)]


def test_an_moe_answer_does_not_depend_on_the_batch():
  """MoE layers route a step's tokens as one group with a capacity per
  expert: the engine serves them without drops, so another row (or an
  idle row's filler token) cannot take a row's expert."""
  from lm.models import moe  # noqa: PLC0415
  cfg = transformer.Config(vocab_size=64, max_len=40, d_model=32, n_layers=2,
                           n_heads=4, n_kv_heads=2, d_ff=64,
                           moe=moe.Config(experts=8, top_k=2))
  graphdef, params = nnx.split(transformer.Model(cfg, nnx.Rngs(0)))
  engine = engine_lib.Engine(graphdef, nnx.to_pure_dict(params), cfg.max_len,
                             engine_lib.Shapes(slots=8, prefill_chunk=8,
                                               prefill_batch=2))
  engine.warm_up()
  engine.start()
  try:
    prompts = _prompts(8, cfg.vocab_size, seed=3)

    def request(p):
      return engine_lib.Request(prompt=p, max_tokens=8, emit=None,
                                temperature=0.0)
    together = _run_all(engine, [request(p) for p in prompts])
    alone = {i: _run_all(engine, [request(p)])[0]
             for i, p in enumerate(prompts)}
  finally:
    engine.stop()
  assert together == alone
