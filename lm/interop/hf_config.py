"""A Hugging Face `config.json` <-> our `config.model`, field by field.

Import reads Llama (2, 3, 3.1: `llama3` rope scaling), Mistral (within its
sliding window) and Qwen2 (q/k/v biases). Every field that changes what the
model computes is either mapped exactly or refused with an HFConfigError
naming it, before any tensor is read: never a silently different model.
Fields that do not change the computation (token ids, cache switches,
initializer ranges, the storage dtype) are ignored; any other field is
named in a warning.

Both the transformers 5 form (`rope_parameters`) and the older one
(`rope_theta` + `rope_scaling`) are read; export writes both, so older
transformers releases read the same rope.
"""
from __future__ import annotations

from typing import Callable

from lm.checks import UserError

# architectures[0] -> model_type written on export.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}

# Read below, or known not to change the computation.
_READ = {
    "architectures", "model_type", "vocab_size", "hidden_size",
    "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling",
    "rope_parameters", "attention_bias", "mlp_bias", "sliding_window",
    "use_sliding_window", "max_window_layers", "layer_types",
    "attention_dropout", "partial_rotary_factor", "pretraining_tp"}
_HARMLESS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
    "initializer_range", "use_cache", "transformers_version", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict",
    "is_encoder_decoder", "tokenizer_class", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "use_return_dict",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "is_decoder"}


class HFConfigError(UserError):
  """A Hugging Face config our model cannot reproduce exactly."""


def _fail(where: str, field: str, message: str):
  raise HFConfigError(f"{where}: {field} {message}")


def _rope(hf: dict, where: str) -> tuple[float, dict]:
  """(rope_theta, our rope_scaling) from either form."""
  params = hf.get("rope_parameters") or {}
  if "layer_types" in params or any(isinstance(v, dict)
                                    for v in params.values()):
    _fail(where, "rope_parameters", "differs per layer type; one rope for "
          "every layer is supported.")
  old = hf.get("rope_scaling") or {}
  if params and old and (old.get("rope_type", old.get("type"))
                         != params.get("rope_type", "default")):
    _fail(where, "rope_scaling", f"= {old} disagrees with rope_parameters = "
          f"{params}; remove the stale one.")
  scaling = params or old
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  factor = scaling.get("partial_rotary_factor",
                       hf.get("partial_rotary_factor", 1.0))
  if factor != 1.0:
    _fail(where, "partial_rotary_factor", f"= {factor}: only full-width "
          "rotary embeddings (1.0) are supported.")
  if kind == "default":
    return theta, {"kind": "none"}
  if kind == "llama3":
    try:
      return theta, {
          "kind": "llama3", "factor": float(scaling["factor"]),
          "low_freq_factor": float(scaling["low_freq_factor"]),
          "high_freq_factor": float(scaling["high_freq_factor"]),
          "original_max_len": int(scaling["original_max_position_embeddings"])}
    except KeyError as e:
      _fail(where, "rope_scaling", f"of type llama3 lacks {e.args[0]!r}.")
  _fail(where, "rope_scaling", f"of type {kind!r} is not supported (only "
        "the default rope and 'llama3'); importing it would give a "
        "different model.")


def model_from_hf(hf: dict, where: str, max_len: int = 0,
                  warn: Callable[[str], None] = print) -> dict:
  """`config.model` values for the Hugging Face config `hf` (read from
  `where`). `max_len` > 0 caps the positional limit (default: the
  checkpoint's max_position_embeddings)."""
  archs = hf.get("architectures") or []
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    _fail(where, "architectures", f"= {archs}: import reads one of "
          f"{sorted(ARCHITECTURES)}.")
  family = ARCHITECTURES[archs[0]]
  if hf.get("quantization_config"):
    _fail(where, "quantization_config", "is set: quantized checkpoints "
          "(GPTQ, AWQ, bitsandbytes ...) cannot be imported; use the float "
          "one.")
  if hf.get("hidden_act", "silu") != "silu":
    _fail(where, "hidden_act", f"= {hf['hidden_act']!r}: the SwiGLU MLP "
          "uses 'silu'.")
  if hf.get("mlp_bias"):
    _fail(where, "mlp_bias", "= true: MLP biases are not supported.")
  if hf.get("attention_dropout", 0.0):
    _fail(where, "attention_dropout", f"= {hf['attention_dropout']}: "
          "attention dropout is not supported; set it to 0.0.")
  limit = int(hf.get("max_position_embeddings", 2048))
  max_len = min(max_len, limit) if max_len > 0 else limit
  window = hf.get("sliding_window")
  sliding = (family == "mistral" or hf.get("use_sliding_window")
             or "sliding_attention" in (hf.get("layer_types") or ()))
  if family == "qwen2" and not hf.get("use_sliding_window"):
    sliding = False
  if sliding and window is not None and int(window) < max_len:
    _fail(where, "sliding_window", f"= {window} is shorter than the "
          f"positional limit {max_len}: sliding-window attention is not "
          f"supported. Import with --max_len={window} (at most the window: "
          "then it never slides).")
  theta, scaling = _rope(hf, where)
  d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or d // heads)
  unknown = sorted(set(hf) - _READ - _HARMLESS)
  if unknown:
    warn(f"{where}: ignored fields {unknown} (not known to change the "
         "model; check them if the logits differ).")
  qkv_bias = family == "qwen2" or bool(hf.get("attention_bias"))
  return dict(
      vocab_size=int(hf["vocab_size"]), max_len=max_len, d_model=d,
      n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or heads),
      d_ff=int(hf["intermediate_size"]),
      head_dim=0 if head_dim * heads == d else head_dim, mlp="swiglu",
      rope_base=theta, rope_scaling=scaling,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=qkv_bias,
      out_bias=family != "qwen2" and bool(hf.get("attention_bias")),
      causal=True, fused_qkv=False)


def hf_from_model(cfg, *, dtype: str, bos_id: int | None, eos_id: int,
                  where: str) -> dict:
  """The Hugging Face config.json of our transformer Config `cfg`; raises
  HFConfigError for what Llama or Qwen2 cannot express. Qwen2 when only
  q/k/v have biases, else Llama (attention_bias when all four have)."""
  key = "config.model"
  if cfg.mlp != "swiglu":
    _fail(where, f"{key}.mlp", f"= {cfg.mlp!r}: Llama and Qwen2 have a "
          "SwiGLU MLP; a GELU model cannot be exported to them.")
  if cfg.moe.experts:
    _fail(where, f"{key}.moe.experts", f"= {cfg.moe.experts}: a mixture of "
          "experts has no Llama/Qwen2 form.")
  if not cfg.causal:
    _fail(where, f"{key}.causal", "= False: not a causal LM.")
  if cfg.out_bias and not cfg.qkv_bias:
    _fail(where, f"{key}.out_bias", "without qkv_bias has no Llama/Qwen2 "
          "form (Llama's attention_bias is all four, Qwen2's q/k/v only).")
  qwen2 = cfg.qkv_bias and not cfg.out_bias
  rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
  if cfg.rope_scaling.kind == "llama3":
    s = cfg.rope_scaling
    rope.update(rope_type="llama3", factor=s.factor,
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_len)
  out = dict(
      architectures=["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
      model_type="qwen2" if qwen2 else "llama",
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.k, hidden_act="silu",
      max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope,
      # The transformers 4 form of the same rope.
      rope_theta=cfg.rope_base,
      rope_scaling=None if rope["rope_type"] == "default" else dict(rope),
      bos_token_id=bos_id, eos_token_id=eos_id, dtype=dtype,
      attention_dropout=0.0, use_cache=True)
  if qwen2:
    out.update(use_sliding_window=False, sliding_window=None)
  else:
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
  return out
