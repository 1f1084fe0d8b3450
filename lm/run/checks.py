"""Checking a whole config before a run: every section by its owner, then
the checks that span sections (here).

Owners: the mesh (lm/parallel/mesh.py), the model's options and shapes
(lm/models/<family>.py), the data and what a task supports (lm/tasks/ and
lm/data/), the precision, optimizer, pruning, distillation, LoRA and privacy
sections (lm/train/), quantization (lm/quant/qat.py), the gradient reduction
(lm/parallel/reduce.py). The patterns of config.quant.layers and
config.prune.layers and config.lora.layers need the model, so
`make_setup` checks them when it builds the model (still before anything
compiles).

Every check runs before any data is read or anything is compiled, and every
message names the config key and how to fix it.
"""
from __future__ import annotations

import json

import jax
import ml_collections

from lm import checks, config as config_lib, models, paths
from lm.data import pipeline, tokenizer as tokenizer_lib
from lm.parallel import mesh as mesh_lib, reduce as reduce_lib
from lm.quant import qat
from lm.run import restore, wandb_sink
from lm.tasks import TASKS
from lm.train import distill, lora, optim, precision, privacy, prune

ConfigError = checks.ConfigError
require = checks.require


def validate(config, num_devices: int | None = None,
             process_count: int | None = None
             ) -> tuple[ml_collections.ConfigDict, dict[str, int]]:
  """(the resolved config, the resolved mesh axis sizes); raises
  ConfigError on the first problem."""
  num_devices = num_devices or jax.device_count()
  process_count = process_count or jax.process_count()
  _names(config)
  config = config_lib.resolve(config)
  mesh = mesh_lib.check(config.mesh, num_devices, process_count)
  model_cfg = models.model_config(config)
  models.check(model_cfg, config.model.name, mesh)
  task = TASKS[config.task](config)
  task.check(model_cfg, mesh)
  precision.check(config.precision)
  optim.check(config.optimizer, config.train.steps)
  qat.check(config.quant)
  prune.check(config.prune, config.train.steps)
  distill.check(config.distill)
  lora.check(config.lora)
  reduce_lib.check(config.train, mesh)
  privacy.check(config.privacy, config_lib.base(config.model.name).privacy)
  _loop(config.train)
  wandb_sink.check(config.log)
  _batch(config, mesh, process_count)
  _sequence(config, model_cfg, mesh)
  _moe(config)
  _privacy(config, mesh)
  if distill.enabled(config):
    _teacher(config, model_cfg, task)
  if lora.enabled(config):
    _lora(config)
  if config.train.init_from:
    _init_from(config)
  return config, mesh


def _names(config) -> None:
  """The model family and the task, before defaults are filled in (the
  base config depends on the family)."""
  family = config.model.name
  checks.one_of(family, models.MODELS, "config.model.name")
  task = config.get("task", config_lib.DEFAULT_TASK[family])
  checks.one_of(task, TASKS, "config.task")
  require(family in TASKS[task].MODELS,
          f"config.model.name={family!r} cannot be trained by "
          f"config.task={task!r}; use one of {TASKS[task].MODELS}.")


def _loop(train) -> None:
  """The run's own keys: how long it trains and how often it reports."""
  require(train.steps > 0, "config.train.steps must be positive.")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    require(train[key] >= 0, f"config.train.{key} must be >= 0 "
            "(0 turns it off).")
  require(train.log_every > 0, "config.train.log_every must be > 0.")
  require(train.eval_batches > 0, "config.train.eval_batches must be > 0.")
  window = train.profile_steps
  require(isinstance(window, (list, tuple)) and (not window or (
      len(window) == 2 and all(isinstance(s, int) for s in window)
      and 0 <= window[0] < window[1] <= train.steps)),
          f"config.train.profile_steps={window!r} must be a (start, stop) "
          f"pair of steps with 0 <= start < stop <= config.train.steps="
          f"{train.steps}, e.g. (10, 13) traces three steps; () turns "
          "profiling off.")


def _batch(config, mesh: dict[str, int], process_count: int) -> None:
  """The global batch against accumulation, the mesh's batch axes and the
  pipeline's microbatches."""
  batch, accum = config.train.batch_size, config.train.grad_accum_steps
  shards = mesh_lib.batch_divisor(mesh)
  require(accum >= 1, f"config.train.grad_accum_steps={accum} must be >= 1.")
  require(batch % accum == 0,
          f"config.train.batch_size={batch} is not divisible by "
          f"config.train.grad_accum_steps={accum}.")
  require((batch // accum) % shards == 0,
          f"config.train.batch_size={batch} (per microbatch "
          f"{batch // accum}) is not divisible by config.mesh.data x "
          f"config.mesh.fsdp x config.mesh.expert = {mesh['data']} x "
          f"{mesh['fsdp']} x {mesh['expert']} = {shards}: "
          "each data shard needs the same number of rows"
          + (f" (and each of the {process_count} processes feeds the rows "
             "of its own devices' shards)" if process_count > 1 else "")
          + f". Use a multiple of {shards * accum}.")
  if mesh["stage"] > 1:
    micro = config.train.microbatches
    per_step = batch // accum
    require(micro >= 1 and per_step % (micro * shards) == 0,
            f"config.train.batch_size={batch} (per accumulation step "
            f"{per_step}) is not divisible by config.train.microbatches="
            f"{micro} x the {shards} batch shards: every pipeline microbatch "
            "is split evenly over the data axes. Use a batch size that is a "
            f"multiple of {micro * shards}, or fewer microbatches.")


# DP-SGD's per-example gradients are tested for the classifiers' and the
# LM's plain step on data, fsdp and tensor axes; each of these would change
# it.
_NOT_PRIVATE = (
    (lambda c, m: c.precision.compute_dtype == "float16",
     "config.precision.compute_dtype='float16'",
     "use float32 or bfloat16 (loss scaling skips steps the accountant "
     "counts)"),
    (lambda c, m: lora.enabled(c), "config.lora.rank", "set it to 0"),
    (lambda c, m: distill.enabled(c), "config.distill.teacher_workdir",
     "train without a teacher"),
    (lambda c, m: c.quant.mode != "none", "config.quant.mode",
     "set config.quant.mode='none'"),
    (lambda c, m: c.train.grad_reduce != "auto", "config.train.grad_reduce",
     "set config.train.grad_reduce='auto'"),
    (lambda c, m: m["stage"] > 1 or m["sequence"] > 1 or m["expert"] > 1,
     "config.mesh.stage/sequence/expert > 1",
     "use the data, fsdp and tensor axes"),
    (lambda c, m: "moe" in c.model and c.model.moe.experts > 0,
     "config.model.moe.experts > 0", "use a dense model (experts=0)"),
    (lambda c, m: c.task == "lm" and c.data.packing != "concat",
     "config.data.packing='segments'",
     "use config.data.packing='concat': an example is one window of the "
     "token stream, and packing documents into windows is no fixed "
     "enumeration of windows to sample from"),
    (lambda c, m: c.data.get("balance_classes", False),
     "config.data.balance_classes=True",
     "set config.data.balance_classes=False (oversampling the small classes"
     " changes each example's sampling rate, which the accountant assumes "
     "is batch_size / examples)"))


def _privacy(config, mesh: dict[str, int]) -> None:
  """What DP-SGD trains (the classifiers, the LM) and combines with."""
  if not privacy.enabled(config.privacy):
    return
  why = {"gan": "the GAN's generator never sees an example, and its "
                "discriminator's step mixes real examples with generated "
                "ones: per-example clipping does not apply",
         "sft": "its records are packed several to a window, so a sampled "
                "window is not one example (per-record sampling is not "
                "implemented)"}
  require(config.task in ("classify", "lm"),
          f"config.privacy (DP-SGD) with config.task={config.task!r}: "
          f"{why.get(config.task, 'not supported')}; train the classifiers "
          "(config.task='classify') or the LM (config.task='lm') privately, "
          "or set config.privacy.noise_multiplier=0 and target_epsilon=0.")
  for bad, key, fix in _NOT_PRIVATE:
    require(not bad(config, mesh),
            f"config.privacy (DP-SGD) with {key} is not supported; {fix}.")


def _sequence(config, model_cfg, mesh: dict[str, int]) -> None:
  """The window (or passage) length against context parallelism."""
  seq = mesh["sequence"]
  if seq == 1:
    return
  length = (pipeline.seq_len(config) if config.task in ("lm", "sft")
            else config.data.seq_len)
  # Causal attention is load-balanced with the zig-zag layout: 2 chunks
  # per device (lm/parallel/context.py).
  ways = 2 * seq if model_cfg.causal else seq
  require(length % ways == 0,
          f"config.data.seq_len={length} (0 = config.model.max_len) is not "
          f"divisible by {'2 x ' if model_cfg.causal else ''}"
          f"config.mesh.sequence = {ways}: "
          + ("the zig-zag layout gives each device two equal chunks. "
             if model_cfg.causal else "each device holds an equal chunk. ")
          + f"Use a multiple of {ways}.")


def _moe(config) -> None:
  """What mixture-of-experts layers do not combine with yet."""
  if "moe" not in config.model or not config.model.moe.experts:
    return
  require(config.quant.mode == "none", "config.model.moe with "
          "config.quant.mode: QAT of the expert layers is not supported; "
          "set config.quant.mode='none'.")
  require(not distill.enabled(config), "config.model.moe with "
          "config.distill.teacher_workdir: the distillation loss does not "
          "include the MoE auxiliary losses yet; train without a teacher.")


# Model fields that change speed or memory, not the parameters.
_PERFORMANCE_ONLY = ("remat", "attention_impl", "attention_chunks",
                     "einsum_grad", "context_parallel", "max_len")


def _run_config(workdir: str, where: str) -> ml_collections.ConfigDict:
  """The resolved config.json of a run that must have a checkpoint."""
  path = paths.resolve(workdir) / "config.json"
  require(path.exists(), f"{where}: {path} does not exist; point it at a "
          "run directory written by scripts/train.py or import_hf.py.")
  directory = paths.resolve(workdir) / "checkpoints"
  require(directory.is_dir() and any(
      p.name.isdigit() for p in directory.iterdir()),
          f"{where} has no checkpoint in {directory}; train it first.")
  values = json.loads(path.read_text())
  require("serving" not in values,
          f"{where} is an int8 serving model; use the training run.")
  try:
    return config_lib.resolve(values)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None


def resume(config, workdir) -> None:
  """A run directory that already holds checkpoints must be resumed with
  the tokenizer it was trained with: its token ids mean that text."""
  old, directory = workdir / "config.json", workdir / "checkpoints"
  if not (old.exists() and directory.is_dir() and any(
      p.name.isdigit() for p in directory.iterdir())):
    return
  if lora.enabled(config):
    _lora_resume(config, workdir)
  before = json.loads(old.read_text()).get("data", {}).get("tokenizer")
  now = config.data.get("tokenizer")
  if before is None or now is None or before == now == "byte":
    return
  try:
    same = tokenizer_lib.same(before, now)
  except ConfigError:  # The old file is gone: compare what the configs say.
    same = before == now
  require(same, f"config.data.tokenizer={now!r} differs from the "
          f"{before!r} that trained the checkpoints in {directory}; its token "
          "ids would mean other text. Resume with that tokenizer, or train "
          "in a new --workdir (with config.train.init_from to start from "
          "this run).")


def _init_from(config) -> None:
  """The run to start from: the same parameter tree and tokenizer."""
  where = f"config.train.init_from={config.train.init_from!r}"
  source = _run_config(config.train.init_from, where)
  ours, theirs = config.model.to_dict(), source.model.to_dict()
  differ = [k for k in sorted(set(ours) | set(theirs))
            if k not in _PERFORMANCE_ONLY and ours.get(k) != theirs.get(k)]
  if differ:
    key = differ[0]
    raise ConfigError(
        f"{where}: its config.model.{key}={theirs.get(key)!r} differs from "
        f"this run's {ours.get(key)!r}; the parameters must have the same "
        "shapes. Start from its config: "
        f"--config=configs/run.py:{config.train.init_from}.")
  require(tokenizer_lib.same(source.data.tokenizer, config.data.tokenizer),
          f"{where}: it was trained with config.data.tokenizer="
          f"{source.data.tokenizer!r}, which differs from this run's "
          f"{config.data.tokenizer!r}; token ids would mean other text. Use "
          "its tokenizer.")


def _lora(config) -> None:
  """What LoRA fine-tunes (a plain run of the transformer LM) and what it
  does not combine with yet."""
  rank = f"config.lora.rank={config.lora.rank}"
  require(config.model.name in lora.FAMILIES,
          f"{rank} with config.model.name={config.model.name!r}: LoRA adapts "
          f"the {' and '.join(lora.FAMILIES)} family only; set "
          "config.lora.rank=0.")
  require(bool(config.train.init_from),
          f"{rank} needs config.train.init_from: the run whose frozen "
          "parameters the adapters are trained on (e.g. one written by "
          "scripts/import_hf.py).")
  unsupported = (
      (distill.enabled(config), "config.distill.teacher_workdir",
       "train without a teacher"),
      (config.prune.sparsity > 0, "config.prune.sparsity",
       "set config.prune.sparsity=0"),
      (config.quant.mode != "none", "config.quant.mode (QAT)",
       "set config.quant.mode='none'; config.lora.base_quant quantizes the "
       "frozen base"),
      (config.model.scan_layers, "config.model.scan_layers",
       "set config.model.scan_layers=False (qwix cannot add adapters "
       "inside a scanned stack of layers)"),
      (config.model.moe.experts > 0, "config.model.moe.experts",
       "use a dense model"),
      (config.train.grad_reduce != "auto", "config.train.grad_reduce",
       "set config.train.grad_reduce='auto'"))
  for bad, key, fix in unsupported:
    require(not bad, f"{rank} with {key} is not supported; {fix}.")
  where = f"config.train.init_from={config.train.init_from!r}"
  source = _run_config(config.train.init_from, where)
  require(source.lora.rank == 0,
          f"{where} is itself a LoRA run; merge it into a plain run first "
          "(scripts/merge_lora.py --workdir=... --out=NEW) and start from "
          "that.")


def _lora_resume(config, workdir) -> None:
  """A LoRA run resumes on the base checkpoint its adapters were trained
  on (lora_base.json), never on another one."""
  recorded = restore.lora_base(workdir)
  require(recorded is not None,
          f"{workdir} holds checkpoints but no {restore.LORA_BASE}: they are "
          "not a LoRA run's (config.lora.rank > 0 here). Train the adapters "
          "in a new --workdir.")
  base = str(paths.resolve(config.train.init_from))
  require(base == recorded["workdir"],
          f"config.train.init_from={config.train.init_from!r} is not the "
          f"base run {recorded['workdir']} that the adapters in {workdir} "
          f"were trained on ({workdir / restore.LORA_BASE}); resume with "
          "that one, or train in a new --workdir.")
  latest = restore.latest_step_on_disk(base)
  require(latest == recorded["step"],
          f"config.train.init_from={config.train.init_from!r}: the base "
          f"run's latest checkpoint is now step {latest}, but the adapters "
          f"in {workdir} were trained on its step {recorded['step']} "
          f"({workdir / restore.LORA_BASE}). Resume on the base the adapters "
          "were trained on (that run's checkpoint), or train new adapters in "
          "a new --workdir.")


def _teacher(config, model_cfg, task) -> None:
  """The teacher run directory against the student (the task says what
  must match between them)."""
  where = f"config.distill.teacher_workdir={config.distill.teacher_workdir!r}"
  teacher = _run_config(config.distill.teacher_workdir, where)
  require(teacher.task == config.task,
          f"{where} trained config.task={teacher.task!r}, the student trains "
          f"{config.task!r}; use a teacher of the same task.")
  task.check_teacher(teacher, models.model_config(teacher), model_cfg, where)
