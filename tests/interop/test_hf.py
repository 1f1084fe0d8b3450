"""Hugging Face interop against the real transformers (PyTorch, CPU): tiny
random-initialized Llama / Qwen2 models saved with save_pretrained, imported,
compared logit by logit and token by token, exported back bit for bit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from conftest import REPO, assert_reordered, init_run, xla_flags
from tokenizer_files import real_files  # noqa: F401 - a fixture.
from lm.checks import ConfigError
from lm.data import tokenizer as tokenizer_lib
from lm.interop import compare, hf_config, hf_run, hf_weights
from lm.run import restore

# The bound for float32 logits against transformers.
MAX_LOGIT_DIFF = 1e-4
LENGTHS = (1, 13, 64)
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=96)
KINDS = {
    # GQA (4 query heads on 2 kv heads), untied head.
    "llama": lambda: transformers.LlamaConfig(**COMMON,
                                              tie_word_embeddings=False),
    # Tied head, Llama 3.1's rope: theta 500000 with llama3 scaling whose
    # original context (32) is shorter than the sequences compared.
    "llama3": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0,
            low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32)),
    # q/k/v biases.
    "qwen2": lambda: transformers.Qwen2Config(**COMMON,
                                              tie_word_embeddings=False),
    # No sliding window; a head_dim (32) other than hidden / heads (16).
    "mistral": lambda: transformers.MistralConfig(
        **COMMON, sliding_window=None, head_dim=32,
        tie_word_embeddings=False),
}


def save_hf(kind: str, path: Path) -> Path:
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(KINDS[kind]())
  with torch.no_grad():  # Non-trivial norms and biases, so both count.
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.5)
      elif "norm" in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {kind: save_hf(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def imported(hf_dirs, tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  runs = {}
  for kind, hf_dir in hf_dirs.items():
    runs[kind] = root / kind
    hf_run.import_run(str(hf_dir), str(runs[kind]), tokenizer="byte",
                      warn=lambda _: None)
  return runs


def hf_logits(hf_dir: Path):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=torch.float32).eval()

  def run(tokens):
    with torch.no_grad():
      return model(torch.as_tensor(tokens)).logits.numpy()
  return run, model


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_logits_and_greedy_tokens_equal_transformers(kind, hf_dirs, imported):
  reference, model = hf_logits(hf_dirs[kind])
  rows = compare.compare(str(imported[kind]), reference, list(LENGTHS),
                         batch=2)
  for row in rows:
    assert row["max_abs_diff"] <= MAX_LOGIT_DIFF, row
    assert row["kl_per_token"] <= 1e-8, row

  prompt = np.random.default_rng(1).integers(0, 256, (1, 8))
  ours = compare.greedy(restore.load(imported[kind]), prompt[0], 40)
  with torch.no_grad():
    theirs = model.generate(torch.as_tensor(prompt), do_sample=False,
                            max_new_tokens=40, min_new_tokens=40,
                            eos_token_id=None, pad_token_id=0).numpy()
  np.testing.assert_array_equal(ours, theirs[0, 8:])


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def test_sharded_import_is_the_same_model(hf_dirs, imported, tmp_path):
  """Placed shard by shard on a (2, 2, 2) mesh: the same bits as the
  default fsdp=8 import, and the same logits as on one device."""
  workdir = tmp_path / "sharded"
  summary = hf_run.import_run(str(hf_dirs["qwen2"]), str(workdir),
                              mesh="2,2,2", tokenizer="byte",
                              warn=lambda _: None)
  # Each device's part read as one block, each replicated part once.
  assert summary["bytes_read"] == 4 * summary["parameters"]
  sharded = restore.load(workdir)
  assert dict(sharded.setup.mesh.shape)["tensor"] == 2
  default = restore.load(imported["qwen2"])
  a, b = _flat(sharded.params), _flat(default.params)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  tokens = np.random.default_rng(2).integers(0, 256, (2, 48))
  one_device = restore.load(workdir, "1,1,1")
  assert_reordered(compare.logits_fn(sharded)(tokens),
                   compare.logits_fn(one_device)(tokens),
                   reduction=COMMON["intermediate_size"])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_import_then_export_gives_back_the_same_bits(kind, hf_dirs, imported,
                                                     tmp_path):
  out = tmp_path / "export"
  hf_run.export_run(str(imported[kind]), str(out))
  original = load_file(hf_dirs[kind] / "model.safetensors")
  exported = load_file(out / "model.safetensors")
  assert exported.keys() == original.keys()
  for name, value in original.items():
    assert exported[name].dtype == value.dtype, name
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  # Mistral without a window is a Llama (the same modules and names).
  assert type(model).__name__ == {"qwen2": "Qwen2ForCausalLM"}.get(
      kind, "LlamaForCausalLM")


@pytest.mark.parametrize("model", [
    dict(scan_layers=True, tie_embeddings=False),
    dict(fused_qkv=True, qkv_bias=True),  # Unfused on export; Qwen2.
    dict(qkv_bias=True, out_bias=True, head_dim=32),  # Llama attention_bias.
], ids=["scanned", "fused_qkv_qwen2", "attention_bias"])
def test_our_models_export_to_transformers(model, tmp_path):
  workdir = init_run(tmp_path, **model)
  out = tmp_path / "hf"
  hf_run.export_run(str(workdir), str(out))
  reference, _ = hf_logits(out)
  for row in compare.compare(str(workdir), reference, [1, 32], batch=2,
                             mesh="1,1,1"):
    assert row["max_abs_diff"] <= MAX_LOGIT_DIFF, row


def test_export_shards_above_the_size_limit(imported, tmp_path):
  out = tmp_path / "sharded"
  summary = hf_run.export_run(str(imported["llama"]), str(out),
                              max_shard_bytes=100_000)
  assert len(summary["files"]) > 2
  index = json.loads((out / hf_weights.INDEX).read_text())
  assert set(index["weight_map"].values()) == set(summary["files"])
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  # And a sharded folder imports like a single file.
  back = tmp_path / "back"
  hf_run.import_run(str(out), str(back), tokenizer="byte",
                    warn=lambda _: None)
  a = _flat(restore.load(back).params)
  b = _flat(restore.load(imported["llama"]).params)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_bfloat16_export_rounds_each_tensor_once(imported, hf_dirs, tmp_path):
  import ml_dtypes  # noqa: PLC0415
  out = tmp_path / "bf16"
  hf_run.export_run(str(imported["llama"]), str(out), dtype="bfloat16")
  original = load_file(hf_dirs["llama"] / "model.safetensors")
  exported = load_file(out / "model.safetensors")
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name],
                                  value.astype(ml_dtypes.bfloat16))
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# A field we cannot honour: an error naming it, before any tensor is read.
BAD_CONFIGS = [
    (dict(architectures=["GPT2LMHeadModel"]), "architectures"),
    (dict(architectures=["MistralForCausalLM"], sliding_window=16),
     "sliding_window"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)),
     "rope_scaling"),
    (dict(rope_parameters=None, rope_scaling=dict(type="linear",
                                                   factor=2.0)),
     "rope_scaling"),
    (dict(rope_scaling=dict(type="linear", factor=2.0)),
     "rope_scaling.*disagrees"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(quantization_config=dict(quant_method="gptq")),
     "quantization_config"),
]


@pytest.mark.parametrize("change,field", BAD_CONFIGS,
                         ids=[f for _, f in BAD_CONFIGS])
def test_unsupported_fields_are_named_before_reading_tensors(
    change, field, hf_dirs, tmp_path, monkeypatch):
  hf_dir = tmp_path / "bad"
  hf_dir.mkdir()
  hf = json.loads((hf_dirs["llama"] / "config.json").read_text())
  hf.update(change)
  (hf_dir / "config.json").write_text(json.dumps(hf))
  # No tensors at all: reaching them would be another error.
  monkeypatch.setattr(hf_weights, "Folder", None)
  with pytest.raises(hf_config.HFConfigError, match=field):
    hf_run.import_run(str(hf_dir), str(tmp_path / "run"), tokenizer="byte")
  assert not (tmp_path / "run").exists()


def test_a_sliding_window_longer_than_max_len_is_the_same_model():
  hf = dict(KINDS["llama"]().to_dict(), architectures=["MistralForCausalLM"],
            sliding_window=64)
  assert hf_config.model_from_hf(hf, "x", max_len=64)["max_len"] == 64
  with pytest.raises(hf_config.HFConfigError, match="--max_len=64"):
    hf_config.model_from_hf(hf, "x")


def _copy_without(src: Path, dst: Path, drop: str = "",
                  reshape: str = "") -> Path:
  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  tensors = load_file(src / "model.safetensors")
  tensors.pop(drop, None)
  if reshape:
    tensors[reshape] = tensors[reshape][:-1]
  save_file(tensors, dst / "model.safetensors")
  return dst


@pytest.mark.parametrize("how,message", [
    ("missing", "missing, e.g. \\['model.layers.1.mlp.up_proj.weight'\\]"),
    ("shape", "model.layers.0.mlp.down_proj.weight has shape \\(64, 95\\)"),
    ("no_weights", "holds neither model.safetensors"),
])
def test_bad_tensors_are_named_and_nothing_is_written(how, message, hf_dirs,
                                                      tmp_path):
  src = hf_dirs["llama"]
  if how == "missing":
    hf_dir = _copy_without(src, tmp_path / "h", drop="model.layers.1.mlp."
                           "up_proj.weight")
  elif how == "shape":
    hf_dir = _copy_without(src, tmp_path / "h")
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors[
        "model.layers.0.mlp.down_proj.weight"][:, :-1]
    save_file(tensors, hf_dir / "model.safetensors")
  else:
    hf_dir = tmp_path / "h"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text((src / "config.json").read_text())
  with pytest.raises(hf_weights.HFWeightsError, match=message):
    hf_run.import_run(str(hf_dir), str(tmp_path / "run"), tokenizer="byte")
  assert not (tmp_path / "run").exists()


def test_what_llama_cannot_express_is_refused_on_export(tmp_path):
  workdir = init_run(tmp_path, mlp="gelu")
  with pytest.raises(hf_config.HFConfigError, match="config.model.mlp"):
    hf_run.export_run(str(workdir), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_existing_outputs_are_never_overwritten(hf_dirs, imported, tmp_path):
  from lm.checks import UsageError  # noqa: PLC0415
  with pytest.raises(UsageError, match="already holds a run"):
    hf_run.import_run(str(hf_dirs["llama"]), str(imported["llama"]),
                      tokenizer="byte")
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(UsageError, match="--overwrite"):
    hf_run.export_run(str(imported["llama"]), str(out))
  assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, f"scripts/{name}.py", *args], cwd=REPO,
      env=dict(os.environ, XLA_FLAGS=xla_flags()), capture_output=True,
      text=True, timeout=600)


@pytest.mark.slow
def test_scripts_import_compare_and_fail_in_one_line(hf_dirs, tmp_path):
  workdir = tmp_path / "run"
  result = _script("import_hf", f"--hf_dir={hf_dirs['qwen2']}",
                   f"--workdir={workdir}", "--tokenizer=byte",
                   "--mesh=2,2,2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "imported Qwen2ForCausalLM" in result.stdout
  result = _script("compare_hf", f"--workdir={workdir}",
                   f"--hf_dir={hf_dirs['qwen2']}", "--lengths=5,40")
  assert result.returncode == 0, result.stderr[-3000:]
  diffs = [float(line.split("max |logit diff| ")[1].split(",")[0])
           for line in result.stdout.splitlines() if "logit diff" in line]
  assert len(diffs) == 2 and max(diffs) <= MAX_LOGIT_DIFF, result.stdout
  bad = tmp_path / "bad"
  bad.mkdir()
  hf = json.loads((hf_dirs["llama"] / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps(dict(hf, mlp_bias=True)))
  result = _script("import_hf", f"--hf_dir={bad}",
                   f"--workdir={tmp_path / 'r2'}", "--tokenizer=byte")
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("error: ")]
  assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
  assert "mlp_bias" in errors[0] and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_folder_with_a_real_tokenizer_imports_generates_and_exports(
    real_files, tmp_path):
  """Mistral's 32k SentencePiece model as the folder's tokenizer.model:
  import copies and uses it, generate.py speaks text through it, export
  writes files transformers' AutoTokenizer encodes the same way."""
  hf_dir = tmp_path / "hf"
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
      **dict(COMMON, vocab_size=32000))).save_pretrained(hf_dir)
  (hf_dir / "tokenizer.model").write_bytes(real_files["mistral"].read_bytes())
  workdir = tmp_path / "run"
  hf_run.import_run(str(hf_dir), str(workdir), warn=lambda _: None)
  config = restore.load_config(workdir)
  assert config.data.tokenizer == str(workdir / "tokenizer" /
                                      "tokenizer.model")
  result = _script("generate", f"--workdir={workdir}", "--prompt=ROMEO:",
                   "--max_new_tokens=5", "--temperature=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ROMEO:" in result.stdout
  out = tmp_path / "out"
  hf_run.export_run(str(workdir), str(out))
  ours = tokenizer_lib.get(config.data.tokenizer)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  text = "ROMEO: But soft, what light through yonder window breaks?"
  assert theirs(text, add_special_tokens=False)["input_ids"] == list(
      ours.encode(text))
  # A model whose vocabulary the tokenizer does not fit: refused, unwritten.
  small = tmp_path / "small"
  save_hf("llama", small)
  (small / "tokenizer.model").write_bytes(real_files["mistral"].read_bytes())
  with pytest.raises(ConfigError, match=r"config\.model\.vocab_size=256 is "
                     r"smaller than the 32000 tokens of config\.data\."
                     r"tokenizer"):
    hf_run.import_run(str(small), str(tmp_path / "run2"))
  assert not (tmp_path / "run2").exists()
