"""A Hugging Face model folder -> a run directory, and a run -> a folder.

An imported run is an ordinary run: config.json, and checkpoints/0 holding
the train state (the imported parameters, a fresh optimizer state) without a
data iterator, so `train.py` fine-tunes it from the start of its data, and
`eval.py` / `generate.py` read it as any run. Its tokenizer is copied into
WORKDIR/tokenizer/ and named by config.data.tokenizer.

Fine-tuning defaults written into an imported run's config (a preset's
pretraining defaults would wreck a pretrained model): AdamW at 2e-5 with
cosine decay to 10%, no warmup, no weight decay, clipping at 1.0; float32
parameters and compute. Override any with --config.x=y when training.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes
import numpy as np

from lm import config as config_lib, models, paths
from lm.checks import UsageError
from lm.data import tokenizer as tokenizer_lib
from lm.interop import hf_config, hf_weights
from lm.parallel import make_mesh, rules as rules_lib
from lm.run import checks as run_checks, loop, restore
from lm.train import checkpoint as ckpt_lib, state as state_lib

TOKENIZER_DIR = "tokenizer"
SOURCE = "hf_source.json"  # Where an imported run came from.
# Hugging Face's own default shard size for save_pretrained.
MAX_SHARD_BYTES = 5 * 2 ** 30
FINE_TUNING = dict(learning_rate=2e-5, schedule="cosine", warmup_steps=0,
                   end_learning_rate_fraction=0.1, weight_decay=0.0,
                   grad_clip_norm=1.0)


def read_hf_config(hf_dir: Path) -> dict:
  path = hf_dir / "config.json"
  if not hf_dir.is_dir():
    raise UsageError(f"--hf_dir={hf_dir} is not a directory; point it at a "
                     "Hugging Face model folder (config.json, *.safetensors).")
  if not path.exists():
    raise UsageError(f"{path} does not exist: --hf_dir must hold a Hugging "
                     "Face model's config.json.")
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise hf_config.HFConfigError(f"{path} is not valid JSON: {e}.") from None


def _tokenizer_source(source: str, hf_dir: Path) -> str:
  """"byte", or the tokenizer file to use: `source`, or "" = the folder's
  own."""
  if source == "byte":
    return "byte"
  path = Path(source) if source else tokenizer_lib.find_in_hf_dir(hf_dir)
  if path is None:
    raise UsageError(
        f"{hf_dir} holds no tokenizer.json or tokenizer.model; pass "
        "--tokenizer=PATH (a tokenizer.json or SentencePiece .model) or "
        "--tokenizer=byte.")
  return str(path)


def save_step0(state, workdir: Path) -> None:
  """A run's step-0 checkpoint of `state` (an import, a merge). Without
  OCDBT: its host buffers would hold most of the state again."""
  ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False,
                               ocdbt=False)
  try:
    ckpt.save(0, state, force=True)
  finally:
    ckpt.close()


def copy_tokenizer(source: str, workdir: Path) -> str:
  """config.data.tokenizer for the run: "byte", or a copy of file `source`
  (with the tokenizer_config.json and chat template beside it: chat in
  scripts/serve.py) in WORKDIR/tokenizer/."""
  if source == "byte":
    return "byte"
  path = Path(source)
  target = workdir / TOKENIZER_DIR
  if jax.process_index() == 0:  # One writer (a shared disk).
    target.mkdir(parents=True, exist_ok=True)
    for sibling in ("tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja"):
      if (path.parent / sibling).exists():
        shutil.copy(path.parent / sibling, target / sibling)
    shutil.copy(path, target / path.name)
  return str(target / path.name)


def import_run(hf_dir: str, workdir: str, *, mesh: str | None = None,
               max_len: int = 0, tokenizer: str = "",
               warn: Callable[[str], None] = print) -> dict:
  """Writes run directory `workdir` from Hugging Face folder `hf_dir`.
  Everything is checked (config fields, tokenizer, tensor names and shapes)
  before a tensor is read. Returns a summary for the script to print."""
  hf_dir = Path(hf_dir).expanduser()
  workdir = paths.resolve(workdir)
  hf = read_hf_config(hf_dir)
  model = hf_config.model_from_hf(hf, str(hf_dir / "config.json"), max_len,
                                  warn)
  if (workdir / "checkpoints").exists() and any(
      (workdir / "checkpoints").iterdir()):
    raise UsageError(f"--workdir={workdir} already holds a run; choose a new "
                     "directory (nothing was overwritten).")
  config = config_lib.base("transformer")
  config.model.update(model)
  config.mesh.update(restore.parse_mesh(mesh) if mesh
                     else dict(data=1, fsdp=-1))
  config.optimizer.update(FINE_TUNING)
  source = _tokenizer_source(tokenizer, hf_dir)
  config.data.tokenizer = source
  config, _ = run_checks.validate(config)  # The tokenizer too.
  folder = hf_weights.Folder(hf_dir)
  with rules_lib.use(rules_lib.Rules()):
    mesh_ = make_mesh(config.mesh)
    setup = state_lib.make_setup(config, mesh_)
    specs = hf_weights.tensors(setup.model_cfg)
    hf_weights.check_folder(folder, setup.model_cfg, specs,
                            setup.abstract_state.params)
    # Everything is checked; only now is anything written.
    workdir.mkdir(parents=True, exist_ok=True)
    config.data.tokenizer = copy_tokenizer(source, workdir)
    with jax.set_mesh(mesh_):
      stats = {}
      state = state_lib.state_from_params(setup, config, hf_weights.read(
          folder, specs, setup.abstract_state.params, stats))
      save_step0(state, workdir)
    parameters = state_lib.count_params(state.params)
    del state  # The devices' memory (the host's, on a CPU) is freed here.
  loop.write_config(config, workdir)
  summary = {"hf_dir": str(hf_dir.resolve()),
             "architecture": hf["architectures"][0],
             "parameters": parameters,
             "tensors": len(specs), "mesh": dict(mesh_.shape),
             # By this process: each reads only what its devices hold.
             "bytes_read": stats["bytes_read"]}
  if jax.process_index() == 0:
    (workdir / SOURCE).write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def export_run(workdir: str, out: str, *, dtype: str = "float32",
               mesh: str | None = None, overwrite: bool = False,
               max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
  """Writes the latest checkpoint of `workdir` as a Hugging Face folder
  `out` that transformers' AutoModelForCausalLM.from_pretrained loads."""
  dtypes = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
  if dtype not in dtypes:
    raise UsageError(f"--dtype={dtype!r}: use one of {sorted(dtypes)}.")
  out_dir = Path(out).expanduser()
  if restore.is_serving_dir(workdir):
    raise UsageError(f"--workdir={workdir} is an int8 serving model; export "
                     "the float run it came from.")
  config = restore.load_config(workdir)
  if config.model.name != "transformer" or config.task not in ("lm", "sft"):
    raise UsageError(f"--workdir={workdir} holds a {config.model.name} "
                     f"({config.task}) run; only language models export.")
  model_cfg = models.model_config(config)
  tok = tokenizer_lib.get(config.data.tokenizer)
  hf = hf_config.hf_from_model(
      model_cfg, dtype=dtype, bos_id=tok.bos_id, eos_id=tok.eos_id,
      where=str(paths.resolve(workdir) / "config.json"))
  if out_dir.exists() and not out_dir.is_dir():
    raise UsageError(f"--out={out_dir} is a file; give a directory.")
  if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
    raise UsageError(f"--out={out_dir} is not empty; choose a new directory "
                     "or pass --overwrite (nothing was written).")
  loaded = restore.load(workdir, mesh)
  out_dir.mkdir(parents=True, exist_ok=True)
  specs = hf_weights.tensors(loaded.setup.model_cfg)
  with jax.set_mesh(loaded.setup.mesh):
    files = hf_weights.write(loaded.params, specs, out_dir, dtypes[dtype],
                             max_shard_bytes)
  (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
  generation = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                "max_length": model_cfg.max_len}
  (out_dir / "generation_config.json").write_text(
      json.dumps(generation, indent=2) + "\n")
  tokenizer_lib.write_hf_files(tok, out_dir)
  return {"step": loaded.step, "files": files,
          "architecture": hf["architectures"][0], "dtype": dtype}
