"""Every performance option computes what the plain path computes: losses and
gradients equal within float32's rounding of their sums (conftest's
assert_reordered); benchmarks, not tests, say how fast."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_reordered, tiny_config
from lm import backend
from lm.run import checks
from lm.models import attention, layers, transformer, tuning

CFG = transformer.Config(vocab_size=64, max_len=24, d_model=32, n_layers=2,
                         n_heads=4, n_kv_heads=2, d_ff=64, mlp="gelu",
                         einsum_grad="autodiff", attention_impl="xla")
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)


def _loss_and_grads(cfg, params=None):
  model = transformer.Model(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  if params is not None:
    state = params

  def loss(p):
    logits = nnx.merge(graphdef, p)(TOKENS[:, :-1])[0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, TOKENS[:, 1:, None], -1)[..., 0])
  return jax.jit(jax.value_and_grad(loss))(state)


def _as_scanned(pure: dict) -> dict:
  """An unrolled model's pure dict in the scanned layout: the blocks'
  leaves stacked on a leading layer axis."""
  blocks = pure["transformer"]["blocks"]
  out = {**pure, "transformer": dict(pure["transformer"])}
  out["transformer"]["blocks"] = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[blocks[i] for i in sorted(blocks)])
  return out


def _run(cfg, plain_cfg):
  """(loss, grads as a pure dict) of `cfg` starting from the parameters
  `plain_cfg` initializes (restacked when only `cfg` scans its layers)."""
  _, params = nnx.split(transformer.Model(plain_cfg, nnx.Rngs(0)))
  _, state = nnx.split(transformer.Model(cfg, nnx.Rngs(0)))
  pure = nnx.to_pure_dict(params)
  if cfg.scan_layers and not plain_cfg.scan_layers:
    pure = _as_scanned(pure)
  nnx.replace_by_pure_dict(state, pure)
  loss, grads = _loss_and_grads(cfg, state)
  return loss, nnx.to_pure_dict(grads)


# The longest sum behind a loss or gradient of CFG: the hidden width (the
# batch's 2 x 15 tokens, the 15 keys and d_model are shorter).
REDUCTION = CFG.d_ff


def _assert_close(a, b):
  """(loss, grads) of two implementations of the same math."""
  assert_reordered(a, b, reduction=REDUCTION)


@pytest.mark.parametrize("model,option", [
    ({}, dict(einsum_grad="small_left")),
    (dict(mlp="swiglu", tie_embeddings=False), dict(einsum_grad="small_left")),
    (dict(scan_layers=True, remat="full"), dict(einsum_grad="small_left")),
    ({}, dict(scan_layers=True)),
    ({}, dict(remat="full")), ({}, dict(remat="dots")),
    ({}, dict(remat="dots_no_batch")),
    (dict(scan_layers=True), dict(remat="dots")),
    ({}, dict(attention_impl="chunked")),
    ({}, dict(attention_impl="chunked", attention_chunks=3)),  # 15 = 5+5+5
    ({}, dict(attention_impl="chunked", attention_chunks=4)),  # uneven
    (dict(n_kv_heads=4), dict(attention_impl="chunked")),  # no grouping
    (dict(causal=False), dict(attention_impl="chunked")),
    (dict(scan_layers=True, remat="full"), dict(attention_impl="chunked")),
], ids=str)
def test_option_equals_the_plain_path(model, option):
  plain = dataclasses.replace(CFG, **model)
  ours = dataclasses.replace(plain, **option)
  loss, grads = _run(plain, plain)
  if ours.scan_layers and not plain.scan_layers:
    grads = _as_scanned(grads)
  _assert_close(_run(ours, plain), (loss, grads))


@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("bld,df->blf", (2, 5, 8), (8, 24)),     # x smaller than the gradient
    ("blf,fd->bld", (2, 5, 24), (24, 8)),    # x larger: the other branch
    ("bld,dhk->blhk", (2, 5, 8), (8, 3, 4)),
    ("blhk,hkd->bld", (2, 5, 3, 4), (3, 4, 8)),
    ("ecf,efd->ecd", (3, 5, 16), (3, 16, 4)),  # an axis shared by all three
])
def test_weight_einsum_gradients_equal_autodiff(equation, x_shape, w_shape):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape)
  g = jax.random.normal(kg, jnp.einsum(equation, x, w).shape)
  ours = jax.vjp(lambda x, w: tuning.weight_einsum(equation, x, w), x, w)
  plain = jax.vjp(lambda x, w: jnp.einsum(equation, x, w), x, w)
  np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6)
  for a, b in zip(ours[1](g), plain[1](g)):  # Sums over the other axes.
    assert_reordered(a, b, reduction=max(math.prod(x_shape),
                                         math.prod(w_shape)))


def test_weight_einsum_float32_output_rounds_the_gradient_like_a_cast():
  """out_dtype=float32 from bfloat16 operands: the forward is the float32
  accumulator (no bf16 rounding); the backward is autodiff of the bfloat16
  einsum followed by a cast to float32 (the gradient enters in bfloat16)."""
  kx, kw, kg = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(kx, (2, 5, 24)).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (24, 8)).astype(jnp.bfloat16)
  g = jax.random.normal(kg, (2, 5, 8))
  ours = jax.vjp(lambda x, w: tuning.weight_einsum(
      "blf,fd->bld", x, w, jnp.float32), x, w)
  cast = jax.vjp(lambda x, w: jnp.einsum("blf,fd->bld", x, w).astype(
      jnp.float32), x, w)
  assert ours[0].dtype == jnp.float32
  np.testing.assert_allclose(ours[0], jnp.einsum(
      "blf,fd->bld", x.astype(jnp.float32), w.astype(jnp.float32)),
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(ours[1](g), cast[1](g)):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=2e-2,
                               atol=2e-2)


@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("bld,df->blf", (2, 5, 8), (8, 24)),
    ("blf,fd->bld", (2, 5, 24), (24, 8)),  # the transposed-result branch
])
def test_weight_einsum_float32_weight_gets_a_float32_gradient(
    equation, x_shape, w_shape):
  """A float32 weight with bfloat16 input: the weight is cast to bf16 for
  the matmul, and its gradient comes back in float32 from the accumulator,
  i.e. the float32 product of the bf16 operands, not rounded to bf16."""
  kx, kw, kg = jax.random.split(jax.random.key(5), 3)
  x = jax.random.normal(kx, x_shape).astype(jnp.bfloat16)
  w = jax.random.normal(kw, w_shape)
  g = jax.random.normal(kg, jnp.einsum(equation, x, w).shape).astype(
      jnp.bfloat16)
  y, vjp = jax.vjp(lambda x, w: tuning.weight_einsum(equation, x, w), x, w)
  dx, dw = vjp(g)
  w16 = w.astype(jnp.bfloat16)
  assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  f32 = lambda t: t.astype(jnp.float32)
  _, vjp32 = jax.vjp(lambda x, w: jnp.einsum(equation, x, w), f32(x), f32(w16))
  dx32, dw32 = vjp32(f32(g))
  # The bf16 operands' products summed in float32: equal up to summation
  # order, far tighter than one bf16 rounding (2**-8 relative).
  np.testing.assert_allclose(dw, dw32, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f32(dx), dx32, rtol=2 ** -8, atol=1e-2)
  np.testing.assert_allclose(f32(y), jnp.einsum(equation, f32(x), f32(w16)),
                             rtol=2 ** -8, atol=1e-2)


@pytest.mark.parametrize("scan", [False, True])
def test_fused_qkv_equals_separate_projections(scan):
  """The fused kernel built from the separate q, k, v kernels gives the same
  loss, and its gradient is theirs, stacked the same way."""
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  fused_cfg = dataclasses.replace(cfg, fused_qkv=True)
  _, separate = nnx.split(transformer.Model(cfg, nnx.Rngs(0)))
  _, fused = nnx.split(transformer.Model(fused_cfg, nnx.Rngs(0)))
  H, N, K = cfg.n_heads, cfg.n_kv_heads, cfg.k
  lead = (cfg.n_layers,) if scan else ()

  def stack(attn):  # q, k, v kernels -> the fused D x N x (G+2) x K kernel.
    q = attn["q"]["kernel"].reshape(*lead, cfg.d_model, N, H // N, K)
    return jnp.concatenate([q, attn["k"]["kernel"][..., None, :],
                            attn["v"]["kernel"][..., None, :]], axis=-2)

  sep = nnx.to_pure_dict(separate)
  fus = nnx.to_pure_dict(fused)
  blocks = ({"": (sep["transformer"]["blocks"], fus["transformer"]["blocks"])}
            if scan else {i: (sep["transformer"]["blocks"][i],
                              fus["transformer"]["blocks"][i])
                          for i in sep["transformer"]["blocks"]})
  for s_block, f_block in blocks.values():
    f_block["attn"]["qkv"]["kernel"] = stack(s_block["attn"])
    for name in ("o",):
      f_block["attn"][name] = s_block["attn"][name]
    f_block["mlp"] = s_block["mlp"]
    for norm in [k for k in s_block if k not in ("attn", "mlp")]:
      f_block[norm] = s_block[norm]
  for key in sep["transformer"]:
    if key != "blocks":
      fus["transformer"][key] = sep["transformer"][key]
  nnx.replace_by_pure_dict(fused, fus)
  loss_s, g_s = _loss_and_grads(cfg)
  loss_f, g_f = _loss_and_grads(fused_cfg, fused)
  np.testing.assert_allclose(loss_f, loss_s, rtol=1e-5)
  g_s, g_f = nnx.to_pure_dict(g_s), nnx.to_pure_dict(g_f)
  s_blocks = g_s["transformer"]["blocks"]
  f_blocks = g_f["transformer"]["blocks"]
  pairs = [(s_blocks, f_blocks)] if scan else [
      (s_blocks[i], f_blocks[i]) for i in s_blocks]
  for s_block, f_block in pairs:
    assert_reordered(f_block["attn"]["qkv"]["kernel"],
                     stack(s_block["attn"]), reduction=REDUCTION)
    assert_reordered(f_block["mlp"]["up"]["kernel"],
                     s_block["mlp"]["up"]["kernel"], reduction=REDUCTION)


def test_unsupported_options_name_the_key_and_the_choices():
  for key, value, allowed in (("einsum_grad", "fast", "autodiff"),
                              ("attention_impl", "flash", "cudnn"),
                              ("remat", "swap", "dots_no_batch")):
    c = tiny_config(**{f"model.{key}": value})
    with pytest.raises(checks.ConfigError,
                       match=rf"config.model.{key}='{value}' .*{allowed}"):
      checks.validate(c, num_devices=1)
  # Known, but not on this (CPU) backend: the error says which backend.
  for key, value in (("attention_impl", "cudnn"), ("remat", "offload")):
    c = tiny_config(**{f"model.{key}": value})
    with pytest.raises(checks.ConfigError,
                       match=rf"config.model.{key}='{value}' needs a .*gpu.* "
                       "backend; this one is cpu. Use one of"):
      checks.validate(c, num_devices=1)


def test_auto_attention_is_cudnn_only_where_cudnn_runs():
  """attention_impl="auto" (the default) is cuDNN's flash attention on a GPU
  for 16-bit inputs with head dims it takes and no mask or segment ids, and
  chunked everywhere else; an explicit choice is kept."""
  assert transformer.Config().attention_impl == "auto"
  bf16, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
  gpu_cases = {(bf16, 64, False): "cudnn", (f16, 128, False): "cudnn",
               (f32, 64, False): "chunked", (bf16, 64, True): "chunked",
               (bf16, 256, False): "chunked", (bf16, 12, False): "chunked"}
  for platform in ("gpu", "tpu", "cpu"):
    with backend.target(platform):
      for (dtype, head_dim, masked), want in gpu_cases.items():
        got = attention.resolve("auto", dtype, head_dim, masked)
        assert got == (want if platform == "gpu" else "chunked"), (
            platform, dtype, head_dim, masked)
      for impl in ("chunked", "xla", "cudnn"):
        assert attention.resolve(impl, bf16, 64, False) == impl


def test_auto_attention_on_cpu_is_chunked_exactly():
  """On a CPU the default runs chunked's program: the same outputs and
  gradients, bit for bit (every CPU figure measured with chunked holds)."""
  kq, kk, kv, kg = jax.random.split(jax.random.key(4), 4)
  q = jax.random.normal(kq, (2, 32, 4, 16), jnp.bfloat16)
  k, v = (jax.random.normal(key, (2, 32, 2, 16), jnp.bfloat16)
          for key in (kk, kv))
  g = jax.random.normal(kg, q.shape, jnp.bfloat16)

  def vjp(impl):
    out, back = jax.vjp(lambda q, k, v: attention.attend(
        q, k, v, causal=True, impl=impl, chunks=2), q, k, v)
    return [out, *back(g)]
  for auto, chunked in zip(vjp("auto"), vjp("chunked")):
    np.testing.assert_array_equal(np.float32(auto), np.float32(chunked))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_chunked_attention_in_low_precision_follows_xla(dtype):
  """bfloat16/float16 inputs: outputs and gradients of "chunked" equal
  jax.nn's up to the rounding of the result to the low dtype (both compute
  scores and softmax in float32; float16 runs from float32 copies on CPU,
  the path both share)."""
  kq, kk, kv, kg = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(kq, (2, 32, 4, 16)).astype(dtype)
  k, v = (jax.random.normal(key, (2, 32, 2, 16)).astype(dtype)
          for key in (kk, kv))
  g = jax.random.normal(kg, q.shape).astype(dtype)

  def vjp(impl):
    out, back = jax.vjp(lambda q, k, v: attention.attend(
        q, k, v, causal=True, impl=impl, chunks=2), q, k, v)
    return [out, *back(g)]
  for ours, plain in zip(vjp("chunked"), vjp("xla")):
    assert ours.dtype == plain.dtype == jnp.dtype(dtype)
    assert_reordered(np.float32(ours), np.float32(plain), dtype=dtype,
                     reduction=1)


# Arbitrary (context-parallel-like) positions, below max_len 24.
ROPE_POSITIONS = [[0, 5, 1, 4, 2, 3], [17, 9, 11, 0, 23, 8]]


def _rope_formula(x, positions):
  """RoPE with the angles computed in the step, in plain jnp: the reference
  for the table's values and (by autodiff) for the custom VJP's gradient."""
  half = x.shape[-1] // 2
  inv_freq = 10_000.0 ** (-jnp.arange(half) / half)
  angle = positions[:, :, None, None] * inv_freq
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle),
                          x2 * jnp.cos(angle) + x1 * jnp.sin(angle)], -1)


def test_rope_table_equals_the_formula():
  """RoPE from the numpy sin/cos table equals computing the angles in the
  step."""
  x = jax.random.normal(jax.random.key(3), (2, 6, 3, 8))
  positions = jnp.array(ROPE_POSITIONS)
  np.testing.assert_allclose(layers.rope(x, positions, 10_000.0, 24),
                             _rope_formula(x, positions), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rope_gradient_equals_autodiff(dtype):
  """RoPE's custom VJP (the rotation by minus the angle) equals autodiff of
  the formula, in the input's dtype. Tolerance: the table's sin/cos against
  float32 angles (as above); in bfloat16 the two float32 gradients may round
  to neighbouring values, one unit (2^-7 relative) apart."""
  kx, kg = jax.random.split(jax.random.key(4))
  x = jax.random.normal(kx, (2, 6, 3, 8)).astype(dtype)
  g = jax.random.normal(kg, x.shape).astype(dtype)
  positions = jnp.array(ROPE_POSITIONS)
  _, back = jax.vjp(lambda x: layers.rope(x, positions, 10_000.0, 24), x)
  _, back_want = jax.vjp(
      lambda x: _rope_formula(x.astype(jnp.float32), positions).astype(dtype),
      x)
  (dx,), (dx_want,) = back(g), back_want(g)
  assert dx.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(np.float32(dx), np.float32(dx_want), atol=1e-5,
                             rtol=1e-5 if dtype == "float32" else 2.0 ** -7)
