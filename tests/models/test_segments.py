"""Segment ids (packed documents): each document of a packed row gets the
logits and gradients it gets alone, in every attention path."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_reordered
from lm.models import attention, transformer
from lm.parallel import context, make_mesh, rules

CFG = transformer.Config(vocab_size=64, max_len=32, d_model=32, n_layers=2,
                         n_heads=4, n_kv_heads=2, d_ff=64)
L = 24
# Two rows of documents (lengths); the rest of each row is padding (id 0).
ROWS = [(7, 9, 5), (12, 10)]


def _packed(rows=ROWS, length=L, seed=0):
  """tokens, positions (restarting at each document, and in the padding),
  segment ids (documents 1..n, padding 0), and each document's (row, start,
  end)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (len(rows), length), np.int32)
  positions = np.zeros_like(tokens)
  segments = np.zeros_like(tokens)
  docs = []
  for b, lengths in enumerate(rows):
    start = 0
    for i, n in enumerate(lengths):
      segments[b, start:start + n] = i + 1
      positions[b, start:start + n] = np.arange(n)
      docs.append((b, start, start + n))
      start += n
    positions[b, start:] = np.arange(length - start)
  return tokens, positions, segments, docs


def _alone(tokens, docs):
  """Each document alone, one per row, right-padded to L with its row's
  other tokens: a causal model's logits at a document's n positions depend
  on its n tokens only, so rows [:n] are the document run alone (one
  batched program instead of one per length, and no segment ids in it)."""
  return np.stack([np.roll(tokens[b], -s) for b, s, _ in docs])


def _assert_close(got, want):
  # The same math summed in another order (masked keys add exact zeros, but
  # other shapes fuse and vectorize differently): float32 rounding of sums
  # over the keys and the width, |error| <= 2 eps sqrt(L * D) max|want|.
  assert_reordered(got, want, reduction=L * CFG.d_model)


def _model(**overrides):
  return transformer.Model(dataclasses.replace(CFG, **overrides),
                           nnx.Rngs(0))


def _jitted(model):
  """(params, apply): apply(params, tokens, positions=None, segments=None,
  cache=None, cache_index=None) -> (logits, cache), jitted."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def apply(p, tokens, positions=None, segments=None, cache=None,
            cache_index=None):
    return nnx.merge(graphdef, p)(tokens, positions, cache, cache_index,
                                  segment_ids_BxL=segments)
  return params, apply


@pytest.mark.parametrize("overrides", [
    dict(attention_impl="chunked", attention_chunks=1),
    dict(attention_impl="chunked", attention_chunks=3),
    dict(attention_impl="xla"),
], ids=str)
def test_packed_logits_equal_each_document_alone(overrides):
  params, apply = _jitted(_model(**overrides))
  tokens, positions, segments, docs = _packed()
  packed, _ = apply(params, tokens, positions, segments)
  alone, _ = apply(params, _alone(tokens, docs))
  for i, (b, start, end) in enumerate(docs):
    _assert_close(packed[b, start:end], alone[i, :end - start])


def test_bidirectional_packed_logits_equal_each_document_alone():
  """causal=False (the encoder): a document alone is its own tokens only
  (one program per length)."""
  params, apply = _jitted(_model(causal=False))
  tokens, positions, segments, docs = _packed()
  packed, _ = apply(params, tokens, positions, segments)
  for b, start, end in docs:
    alone, _ = apply(params, tokens[b:b + 1, start:end])
    _assert_close(packed[b, start:end], alone[0])


def _doc_losses(logits_BxLxV, tokens_BxL, spans):
  """Next-token cross-entropy summed over each (row, start, end) span."""
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1])
  nll_BxL = -jnp.take_along_axis(logp_BxLxV, tokens_BxL[:, 1:, None],
                                 -1)[..., 0]
  return sum(nll_BxL[b, s:e - 1].sum() for b, s, e in spans)


def _packed_and_alone_grads(model, mesh=None):
  """Gradients w.r.t. the parameters of the packed batch's loss (padding
  excluded) and of the sum of the documents' losses, each run alone. With a
  `sequence` mesh, the packed batch runs in the LM's context-parallel
  layout: zig-zag permuted, tokens, positions and segment ids together
  (lm/tasks/language.py)."""
  tokens, positions, segments, docs = _packed()
  graphdef, params = nnx.split(model)
  n = 1 if mesh is None else mesh.shape["sequence"]
  perm = context.zigzag_permutation(L, n)
  back = np.argsort(perm)

  def packed_loss(p, tokens, positions, segments):
    logits, _ = nnx.merge(graphdef, p)(tokens, positions,
                                       segment_ids_BxL=segments)
    return _doc_losses(logits[:, back], tokens[:, back], docs)

  def alone_loss(p, alone):
    logits, _ = nnx.merge(graphdef, p)(alone)
    return _doc_losses(logits, alone,
                       [(i, 0, e - s) for i, (_, s, e) in enumerate(docs)])

  want = jax.jit(jax.grad(alone_loss))(params, _alone(tokens, docs))
  args = [x[:, perm] for x in (tokens, positions, segments)]
  if mesh is None:
    return jax.jit(jax.grad(packed_loss))(params, *args), want
  with jax.set_mesh(mesh), rules.use(rules.Rules()):
    return jax.jit(jax.grad(packed_loss))(params, *args), want


@pytest.mark.parametrize("overrides", [
    dict(attention_impl="chunked", attention_chunks=2),  # Its custom VJP.
    # nnx.scan over the layers and the tied remat's custom VJP.
    dict(attention_impl="chunked", scan_layers=True, remat="full"),
], ids=str)
def test_packed_gradients_equal_sum_over_documents(overrides):
  got, want = _packed_and_alone_grads(_model(**overrides))
  # Weight gradients sum over every token of the batch and the width.
  assert_reordered(got, want, reduction=2 * L * CFG.d_ff)


@pytest.mark.parametrize("impl", context.IMPLS)
def test_context_parallel_zigzag_equals_documents_alone(impl):
  """sequence=4, zig-zag layout: the ring's key ids travel with K/V (forward
  and backward), all_gather gathers them."""
  mesh = make_mesh(dict(sequence=4), jax.devices()[:4])
  got, want = _packed_and_alone_grads(_model(context_parallel=impl), mesh)
  assert_reordered(got, want, reduction=2 * L * CFG.d_ff)


def test_pipeline_with_segment_ids():
  """gpipe (stage=2, 2 microbatches) carries the positions and ids of each
  microbatch together (stacked on a last axis)."""
  model = _model(scan_layers=True, pipeline_microbatches=2)
  params, apply = _jitted(model)
  tokens, positions, segments, _ = _packed()
  want, _ = apply(params, tokens, positions, segments)
  mesh = make_mesh(dict(stage=2), jax.devices()[:2])
  with jax.set_mesh(mesh), rules.use(rules.Rules()):
    got, _ = apply(params, tokens, positions, segments)
  _assert_close(got, want)


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_packed_prefill_and_decode(scan):
  """Two prompts packed in one row of the cache: the prefill and one decode
  step for each (both in one call) equal each prompt decoded alone."""
  model = _model(scan_layers=scan)
  params, apply = _jitted(model)
  rng = np.random.default_rng(1)
  a, b = (rng.integers(0, CFG.vocab_size, (1, n), np.int32) for n in (5, 4))
  na, nb = a.shape[1], b.shape[1]
  tokens = np.concatenate([a, b], axis=1)
  positions = np.concatenate([np.arange(na), np.arange(nb)])[None]
  segments = np.array([[1] * na + [2] * nb], np.int32)
  cache = model.init_cache(1, 16, segments=True)
  stacked = transformer.stack_cache(cache)  # Either layout.
  assert stacked["segment_ids"].shape == (CFG.n_layers, 1, 16)
  packed, cache = apply(params, tokens, positions, segments, cache, 0)
  # Next tokens: one for each request, side by side after the prompts.
  nxt = np.array([[7, 11]], np.int32)
  step, _ = apply(params, nxt, np.array([[na, nb]]), np.array([[1, 2]]),
                  cache, na + nb)
  for i, (prompt, start) in enumerate([(a, 0), (b, na)]):
    n = prompt.shape[1]
    alone, alone_cache = apply(params, prompt, None, None,
                               model.init_cache(1, 16), 0)
    _assert_close(packed[:, start:start + n], alone)
    alone_step, _ = apply(params, nxt[:, i:i + 1], None, None, alone_cache, n)
    _assert_close(step[:, i:i + 1], alone_step)


def test_kv_cache_needs_segment_slots():
  model = _model()
  tokens, positions, segments, _ = _packed()
  with pytest.raises(ValueError, match="segments=True"):
    model(tokens, positions, cache=model.init_cache(2, L), cache_index=0,
          segment_ids_BxL=segments)
  with pytest.raises(ValueError, match="segments=True"):
    model(tokens, positions, cache=model.init_cache(2, L, segments=True),
          cache_index=0)


def test_cudnn_refuses_segment_ids():
  assert attention.supports_segments("chunked")
  assert attention.supports_segments("xla")
  assert not attention.supports_segments("cudnn")
  q = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match="'cudnn' cannot honour segment ids"):
    attention.attend(q, q, q, causal=True, impl="cudnn",
                     segment_ids_BxL=jnp.ones((1, 8), jnp.int32))
