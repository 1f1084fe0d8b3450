"""Every config loads; every bad value fails before compiling, naming the key."""
import glob
import importlib.util
import json
import math
import os

import jax
import pytest

from conftest import REPO, tiny_config
from lm.checks import ConfigError
from lm.parallel import make_mesh
from lm.run import checks
from lm.train import state as state_lib


def _check(config, num_devices: int = 8) -> None:
  """What a run checks before it compiles or reads data: every section
  (lm/run/checks.py), then the quant and prune patterns against the
  abstract model (make_setup)."""
  config, mesh_sizes = checks.validate(config, num_devices=num_devices)
  mesh = make_mesh(mesh_sizes, jax.devices()[:num_devices])
  with jax.set_mesh(mesh):
    state_lib.make_setup(config, mesh)


def _load(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Experiment files (configs/__init__.py is not one; configs/run.py reads
# an existing run's config: test_run_config_is_the_runs_own).
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(REPO, "configs",
                                                        "*.py"))
                      if "def get_config" in open(p).read()
                      and not p.endswith("run.py"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_loads_and_validates(path):
  module = _load(path)
  presets = getattr(module, "SIZES", {None: None})
  for preset in presets:
    config = module.get_config(preset) if preset else module.get_config()
    # On its own mesh: 8 devices where an axis is -1, else the fixed product.
    sizes = list(config.mesh.values())
    devices = 8 if -1 in sizes else math.prod(sizes)
    _check(config, num_devices=devices)


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="configs/lm.py:huge"):
    _load(os.path.join(REPO, "configs", "lm.py")).get_config("huge")


BAD = [
    ({"mesh": dict(data=3, fsdp=1, tensor=1)}, r"config\.mesh.*8 devices"),
    ({"mesh": dict(data=-1, fsdp=-1, tensor=1)}, r"config\.mesh: only one"),
    ({"mesh": dict(data=-1, fsdp=3, tensor=1)}, r"config\.mesh.*divide"),
    ({"mesh": dict(data=8, fsdp=1, tensor=1), "train.batch_size": 12},
     r"config\.train\.batch_size=12.*config\.mesh\.data x config\.mesh\.fsdp"),
    ({"mesh": dict(data=1, fsdp=1, tensor=8)},
     r"config\.model\.n_heads=4 is not divisible by config\.mesh\.tensor=8"),
    ({"mesh": dict(data=4, fsdp=1, tensor=2), "model.n_kv_heads": 1},
     r"config\.model\.n_kv_heads=1 is not divisible by config\.mesh\.tensor"),
    ({"mesh": dict(data=4, fsdp=1, tensor=2), "model.d_ff": 129},
     r"config\.model\.d_ff=129 is not divisible by config\.mesh\.tensor=2"),
    ({"model.n_kv_heads": 3}, r"n_heads=4 is not a multiple of.*n_kv_heads=3"),
    ({"optimizer.name": "adamm"}, r"config\.optimizer\.name='adamm'"),
    ({"optimizer.schedule": "cosin"}, r"config\.optimizer\.schedule='cosin'"),
    ({"optimizer.learning_rate": -1e-3},
     r"config\.optimizer\.learning_rate=-0\.001 must be a positive finite"),
    ({"optimizer.learning_rate": float("nan")},
     r"config\.optimizer\.learning_rate=nan must be a positive finite"),
    ({"optimizer.learning_rate": float("inf")},
     r"config\.optimizer\.learning_rate=inf must be a positive finite"),
    ({"optimizer.warmup_steps": 4},
     r"config\.optimizer\.warmup_steps=4 must be >= 0 and at most "
     r"config\.train\.steps=3"),
    ({"optimizer.warmup_steps": -1}, r"config\.optimizer\.warmup_steps=-1"),
    ({"optimizer.weight_decay": float("nan")},
     r"config\.optimizer\.weight_decay=nan must be a finite number >= 0"),
    ({"optimizer.weight_decay": -0.1},
     r"config\.optimizer\.weight_decay=-0\.1 must be a finite number >= 0"),
    ({"optimizer.grad_clip_norm": -1.0},
     r"config\.optimizer\.grad_clip_norm=-1\.0 must be a finite"),
    ({"optimizer.grad_clip_norm": float("inf")},
     r"config\.optimizer\.grad_clip_norm=inf must be a finite"),
    ({"optimizer.end_learning_rate_fraction": 1.5},
     r"config\.optimizer\.end_learning_rate_fraction=1\.5 must be in"),
    ({"optimizer.b2": 1.0}, r"config\.optimizer\.b2=1\.0 must be in \[0, 1\)"),
    ({"optimizer.eps": 0.0}, r"config\.optimizer\.eps=0\.0 must be > 0"),
    ({"train.eval_every": -1}, r"config\.train\.eval_every must be >= 0"),
    ({"train.checkpoint_every": -5},
     r"config\.train\.checkpoint_every must be >= 0"),
    ({"precision.compute_dtype": "fp8"}, r"config\.precision\.compute_dtype"),
    ({"precision.param_dtype": "int8"}, r"config\.precision\.param_dtype"),
    ({"model.remat": "some"}, r"config\.model\.remat='some'"),
    ({"data.seq_len": 64}, r"config\.data\.seq_len=64 must be.*max_len=32"),
    ({"model.vocab_size": 100}, r"config\.model\.vocab_size=100"),
    ({"data.corpus": "wiki"}, r"config\.data\.corpus='wiki'"),
    ({"data.corpus": "text_dir", "data.text_dir": "/nonexistent/dir"},
     r"config\.data\.text_dir='/nonexistent/dir' is not a directory"),
    ({"data.corpus": "text_dir"}, r"needs config\.data\.text_dir"),
    ({"train.grad_accum_steps": 3}, r"config\.train\.batch_size=16 is not "
     r"divisible by config\.train\.grad_accum_steps=3"),
    ({"model.n_layer": 3},
     r"config\.model\.n_layer is unknown; did you mean config\.model\.n_layers\?"),
    ({"train.stpes": 10},
     r"config\.train\.stpes is unknown; did you mean config\.train\.steps\?"),
    ({"data.text_dir": "/some/dir"},
     r"config\.data\.text_dir='/some/dir' is set but config\.data\.corpus="
     r"'shakespeare' does not read it.*--config\.data\.corpus=text_dir"),
    # Compression (lm/quant, lm/train/prune.py, lm/train/distill.py).
    ({"quant.mode": "int2"}, r"config\.quant\.mode='int2' is unknown"),
    ({"quant.mode": "int8", "quant.layers": ("decoder/.*",)},
     r"config\.quant\.layers: 'decoder/\.\*' matches no layer.*"
     r"transformer/blocks/0/attn/k"),
    ({"quant.mode": "int8", "quant.layers": ()},
     r"config\.quant\.layers is empty"),
    ({"quant.mode": "int4"}, r"config\.quant\.mode='int4': the cpu backend "
     r"cannot compile int4 x int4.*int4_weights"),
    ({"quant.mode": "int8", "quant.backward": "int2"},
     r"config\.quant\.backward='int2'"),
    ({"quant.mode": "int4_weights", "quant.activations": "int4"},
     r"config\.quant\.activations='int4'"),
    ({"prune.sparsity": 1.0}, r"config\.prune\.sparsity"),
    ({"prune.sparsity": 0.5, "prune.layers": ("nothing/kernel",)},
     r"config\.prune\.layers.*nothing/kernel"),
    ({"prune.sparsity": 0.5, "prune.update_every": 0},
     r"config\.prune\.update_every"),
    # Context, pipeline and expert parallelism (tiny: seq 32, 2 layers).
    ({"mesh": dict(sequence=8), "data.seq_len": 24},
     r"config\.data\.seq_len=24 .*not divisible by 2 x config\.mesh\."
     r"sequence = 16.*zig-zag"),
    ({"mesh": dict(sequence=8), "model.context_parallel": "flash"},
     r"config\.model\.context_parallel='flash'"),
    ({"mesh": dict(stage=2, data=4)},
     r"config\.mesh\.stage=2 needs config\.model\.scan_layers=True"),
    ({"mesh": dict(stage=8), "model.scan_layers": True},
     r"config\.model\.n_layers=2 is not divisible by config\.mesh\.stage=8"),
    ({"mesh": dict(stage=2, data=4), "model.scan_layers": True,
      "train.microbatches": 3},
     r"config\.train\.batch_size=16 .*not divisible by "
     r"config\.train\.microbatches=3"),
    ({"mesh": dict(expert=8), "model.moe.experts": 4},
     r"config\.model\.moe\.experts=4 is not divisible by "
     r"config\.mesh\.expert=8"),
    ({"model.moe.experts": 4, "model.moe.top_k": 5},
     r"config\.model\.moe\.top_k=5 must be between 1 and "
     r"config\.model\.moe\.experts=4"),
    ({"model.moe.experts": 4, "model.moe.capacity": 2},
     r"config\.model\.moe\.capacity is unknown; did you mean "
     r"config\.model\.moe\.capacity_factor\?"),
    ({"train.grad_reduce": "reduce_scatter", "mesh": dict(data=4, sequence=2)},
     r"grad_reduce='reduce_scatter' needs config\.mesh\.sequence=1"),
    ({"distill.teacher_workdir": "/nonexistent/run"},
     r"config\.distill\.teacher_workdir='/nonexistent/run'.*does not exist"),
]


@pytest.mark.parametrize("overrides,message", BAD,
                         ids=[m for _, m in BAD])
def test_bad_config_is_rejected_with_the_key_named(overrides, message):
  config = tiny_config(**{"mesh": dict(data=-1, fsdp=1, tensor=1),
                          **overrides})
  with pytest.raises(ConfigError, match=message):
    _check(config)


def test_empty_text_dir_is_rejected(tmp_path):
  (tmp_path / "a.txt").write_text("only one file")
  (tmp_path / "empty.txt").write_text("")
  config = tiny_config(**{"data.corpus": "text_dir",
                          "data.text_dir": str(tmp_path),
                          "mesh": dict(data=-1, fsdp=1, tensor=1)})
  with pytest.raises(ConfigError, match="holds 1 non-empty .txt file"):
    checks.validate(config, num_devices=8)


def test_bad_config_fails_before_any_compile(tmp_path, monkeypatch):
  """The run validates first: nothing is compiled or written."""
  import jax  # noqa: PLC0415
  from lm.run import loop  # noqa: PLC0415

  def no_jit(*a, **k):
    raise AssertionError("jit called before validation")
  monkeypatch.setattr(jax, "jit", no_jit)
  config = tiny_config(**{"mesh": dict(data=1, fsdp=1, tensor=8)})
  with pytest.raises(ConfigError):
    loop.train(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def _family(name):
  return _load(os.path.join(REPO, "configs", f"{name}.py")).get_config()


BAD_FAMILY = [
    ("mlp_digits", {"data.dataset": "cifar"}, r"config\.data\.dataset='cifar'"),
    ("gan_digits", {"data.dataset": "cifar"}, r"config\.data\.dataset='cifar'"),
    ("mlp_digits", {"model.name": "resnet"}, r"config\.model\.name='resnet'"),
    ("mlp_digits", {"task": "segment"}, r"config\.task='segment'"),
    ("mlp_digits", {"model.name": "gan"},
     r"config\.model\.name='gan' cannot be trained by config\.task='classify'"),
    ("mlp_digits", {"data.dataset": "mnist"},
     r"config\.model\.image_shape=\(8, 8, 1\) does not fit "
     r"config\.data\.dataset='mnist'.*\(28, 28, 1\)"),
    ("gan_mnist", {"data.dataset": "digits"},
     r"config\.model\.image_shape=\(28, 28, 1\) does not fit"),
    ("mlp_digits", {"model.num_classes": 12},
     r"config\.model\.num_classes=12 differs from the 10 labels"),
    ("classify_text", {"model.num_classes": 10},
     r"config\.model\.num_classes=10 differs from the 4 labels"),
    ("classify_text", {"data.dataset": "digits"},
     r"classified by config\.model\.name='mlp'"),
    ("classify_text", {"data.seq_len": 512}, r"config\.data\.seq_len=512"),
    ("gan_digits", {"model.arch": "dcgan", "model.image_shape": (8, 8, 1)},
     None),  # 8x8 is a multiple of 4: allowed.
    ("gan_digits", {"model.arch": "vae"}, r"config\.model\.arch='vae'"),
    ("gan_digits", {"train.grad_accum_steps": 2},
     r"config\.train\.grad_accum_steps=2: the GAN step"),
    ("mlp_digits", {"model.dropout": 1.0}, r"config\.model\.dropout=1\.0"),
    ("mlp_digits", {"model.activation": "swish"},
     r"config\.model\.activation='swish'"),
    ("mlp_digits", {"quant.mode": "int8", "quant.layers": ("head/.*",)},
     r"config\.quant\.layers: 'head/\.\*' matches no layer"),
    ("gan_digits", {"quant": dict(mode="int8", layers=(".*",))},
     r"config\.quant\.mode='int8'.*not config\.task='gan'"),
]


@pytest.mark.parametrize("name,overrides,message", BAD_FAMILY,
                         ids=[f"{n}:{m}" for n, _, m in BAD_FAMILY])
def test_bad_family_config_is_rejected(name, overrides, message):
  config = _family(name)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  if message is None:
    _check(config)
  else:
    with pytest.raises(ConfigError, match=message):
      _check(config)


def _finished_run(path, config) -> None:
  """A stand-in teacher: its config.json and an (empty) step directory are
  all that validation reads."""
  path.mkdir()
  (path / "config.json").write_text(config.to_json())
  (path / "checkpoints" / "3").mkdir(parents=True)


TEACHER_MISMATCH = [
    ({"model.vocab_size": 512}, r"teacher's model\.vocab_size=512 differs "
     r"from the student's 256"),
    ({"model.max_len": 16}, r"teacher's model\.max_len=16 is shorter"),
    ({"task": "classify"}, r"trained config\.task='classify'"),
]


@pytest.mark.parametrize("teacher,message", TEACHER_MISMATCH,
                         ids=[m for _, m in TEACHER_MISMATCH])
def test_teacher_that_does_not_fit_is_rejected(tmp_path, teacher, message):
  _finished_run(tmp_path / "teacher", tiny_config(
      **{"mesh": dict(data=-1, fsdp=1, tensor=1), **teacher}))
  student = tiny_config(**{"mesh": dict(data=-1, fsdp=1, tensor=1),
                           "distill.teacher_workdir": str(tmp_path / "teacher")})
  with pytest.raises(ConfigError, match=message):
    checks.validate(student)


def test_teacher_without_checkpoint_is_rejected(tmp_path):
  (tmp_path / "teacher").mkdir()
  (tmp_path / "teacher" / "config.json").write_text(tiny_config().to_json())
  student = tiny_config(**{"mesh": dict(data=-1, fsdp=1, tensor=1),
                           "distill.teacher_workdir": str(tmp_path / "teacher")})
  with pytest.raises(ConfigError, match="has no checkpoint.*train it first"):
    checks.validate(student)


@pytest.fixture
def other_tokenizer(tmp_path):
  """A tokenizer.json that is not the byte tokenizer (the same ids, but
  another file: what matters is that it is another tokenizer)."""
  from lm.data import tokenizer as tokenizer_lib  # noqa: PLC0415
  tokenizer_lib.write_hf_files(tokenizer_lib.get("byte"), tmp_path / "tok")
  return str(tmp_path / "tok" / "tokenizer.json")


INIT_FROM_MISMATCH = [
    ({"model.d_ff": 64}, r"its config\.model\.d_ff=128 differs from this "
     r"run's 64.*configs/run\.py:"),
    ({"model.scan_layers": True}, r"config\.model\.scan_layers=False"),
    ({"data.tokenizer": "OTHER"}, r"config\.data\.tokenizer='byte'.*differs"),
]


@pytest.mark.parametrize("change,message", INIT_FROM_MISMATCH,
                         ids=["d_ff", "scan_layers", "tokenizer"])
def test_init_from_a_run_of_another_shape_or_tokenizer_is_rejected(
    tmp_path, other_tokenizer, change, message):
  config = tiny_config(**{"mesh": dict(data=-1, fsdp=1, tensor=1)})
  _finished_run(tmp_path / "source", config)
  change = {k: other_tokenizer if v == "OTHER" else v
            for k, v in change.items()}
  ok = tiny_config(**{"mesh": dict(data=-1, fsdp=1, tensor=1),
                      "train.init_from": str(tmp_path / "source"),
                      "model.remat": "full"})  # Speed-only keys may differ.
  checks.validate(ok)
  bad = tiny_config(**{"mesh": dict(data=-1, fsdp=1, tensor=1),
                       "train.init_from": str(tmp_path / "source"), **change})
  with pytest.raises(ConfigError, match=message):
    checks.validate(bad)


def test_resuming_with_another_tokenizer_is_rejected(tmp_path,
                                                     other_tokenizer):
  _finished_run(tmp_path / "run", tiny_config())
  checks.resume(tiny_config(), tmp_path / "run")  # The same: fine.
  with pytest.raises(ConfigError, match=r"config\.data\.tokenizer=.*"
                     r"differs from the 'byte' that trained"):
    checks.resume(tiny_config(**{"data.tokenizer": other_tokenizer}),
                  tmp_path / "run")


def test_run_config_is_the_runs_own(tmp_path):
  config = tiny_config(**{"mesh": dict(data=-1, fsdp=1, tensor=1),
                          "model.d_ff": 96})
  _finished_run(tmp_path / "run", config)
  loaded = _load(os.path.join(REPO, "configs", "run.py")).get_config(
      str(tmp_path / "run"))
  expected = checks.validate(config)[0]
  assert loaded.model.d_ff == 96
  assert json.loads(loaded.to_json()) == json.loads(expected.to_json())
  checks.validate(loaded)
