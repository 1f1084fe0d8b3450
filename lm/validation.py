"""Config validation: every check runs before any data is read or anything is
compiled, and every message names the config key and how to fix it."""
from __future__ import annotations

import json

import jax
import ml_collections
from flax import nnx

from lm import models, paths, quant
from lm.data import genres, images, pipeline, sources, tokenizer as tokenizer_lib
from lm.models import attention, gan, layers
from lm.tasks import classify
from lm.parallel import context, mesh as mesh_lib, reduce as reduce_lib
from lm.train import distill, optim, prune
from lm.train import state as state_lib

DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")


# Which model families each task trains.
TASK_MODELS = {
    "lm": ("transformer",),
    "classify": ("mlp", "transformer_classifier"),
    "gan": ("gan",),
}


class ConfigError(ValueError):
  pass


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _one_of(value, allowed, key: str) -> None:
  _require(value in allowed, f"{key}={value!r} is unknown; use one of "
           f"{sorted(allowed)}.")


def validate(config, num_devices: int | None = None,
             process_count: int | None = None) -> dict[str, int]:
  """Raises ConfigError on the first problem; returns the resolved mesh."""
  num_devices = num_devices or jax.device_count()
  process_count = process_count or jax.process_count()
  try:
    mesh = mesh_lib.resolve_shape(config.mesh, num_devices)
  except ValueError as e:
    where = (f" (the mesh spans all {process_count} processes: "
             f"{num_devices} devices in all, {num_devices // process_count} "
             "per process)" if process_count > 1 else "")
    raise ConfigError(str(e) + where) from None

  # Names.
  _one_of(config.model.name, models.MODELS, "config.model.name")
  _one_of(config.optimizer.name, optim.UPDATE_RULES, "config.optimizer.name")
  _one_of(config.optimizer.get("schedule", "cosine"), optim.SCHEDULES,
          "config.optimizer.schedule")
  _one_of(config.precision.compute_dtype, DTYPES,
          "config.precision.compute_dtype")
  _one_of(config.precision.param_dtype, PARAM_DTYPES,
          "config.precision.param_dtype")
  task = config.get("task", "lm")
  _one_of(task, TASK_MODELS, "config.task")
  _require(config.model.name in TASK_MODELS[task],
           f"config.model.name={config.model.name!r} cannot be trained by "
           f"config.task={task!r}; use one of {TASK_MODELS[task]}.")
  try:
    cfg = models.model_config(config)
  except (ValueError, TypeError) as e:
    raise ConfigError(str(e)) from None
  if config.model.name in ("transformer", "transformer_classifier"):
    _transformer(cfg, mesh)
  elif config.model.name == "mlp":
    _one_of(cfg.activation, layers.ACTIVATIONS, "config.model.activation")
    _require(cfg.depth >= 1 and cfg.width >= 1, "config.model.depth and "
             "config.model.width must be positive.")
    _require(0.0 <= cfg.dropout < 1.0,
             f"config.model.dropout={cfg.dropout} must be in [0, 1).")
  elif config.model.name == "gan":
    _one_of(cfg.arch, gan.ARCHS, "config.model.arch")
    h, w, _ = cfg.image_shape
    _require(cfg.arch != "dcgan" or (h % 4 == 0 and w % 4 == 0),
             f"config.model.image_shape={cfg.image_shape}: the dcgan "
             "architecture upsamples twice by 2, so height and width must be"
             " multiples of 4; use arch='mlp' for other shapes.")

  # Batch.
  batch, accum = config.train.batch_size, config.train.get("grad_accum_steps",
                                                          1)
  shards = mesh_lib.batch_divisor(mesh)
  _require(accum >= 1, f"config.train.grad_accum_steps={accum} must be >= 1.")
  _require(batch % accum == 0,
           f"config.train.batch_size={batch} is not divisible by "
           f"config.train.grad_accum_steps={accum}.")
  _require((batch // accum) % shards == 0,
           f"config.train.batch_size={batch} (per microbatch "
           f"{batch // accum}) is not divisible by config.mesh.data x "
           f"config.mesh.fsdp x config.mesh.expert = {mesh['data']} x "
           f"{mesh['fsdp']} x {mesh['expert']} = {shards}: "
           "each data shard needs the same number of rows"
           + (f" (and each of the {process_count} processes feeds the rows "
              "of its own devices' shards)" if process_count > 1 else "")
           + f". Use a multiple of {shards * accum}.")

  # Training loop.
  _require(config.train.steps > 0, "config.train.steps must be positive.")
  for key in ("log_every", "eval_every", "checkpoint_every"):
    _require(config.train[key] >= 0, f"config.train.{key} must be >= 0 "
             "(0 turns it off).")
  _require(config.train.log_every > 0, "config.train.log_every must be > 0.")
  _require(config.train.get("eval_batches", 1) > 0,
           "config.train.eval_batches must be > 0.")

  {"lm": _lm_data, "classify": _classify_data, "gan": _gan_data}[task](
      config, cfg)
  _compression(config, cfg, task)
  _grad_reduce(config, task)
  if config.model.name in ("transformer", "transformer_classifier"):
    _strategies(config, cfg, mesh, task)
  else:
    for axis in ("sequence", "stage", "expert"):
      _require(mesh[axis] == 1, f"config.mesh.{axis}={mesh[axis]}: sequence,"
               " stage and expert parallelism are for the Transformer "
               "families; set it to 1.")
  return mesh


def _strategies(config, cfg, mesh: dict[str, int], task: str) -> None:
  """Context, pipeline and expert parallelism against the shapes."""
  seq, stage, expert = mesh["sequence"], mesh["stage"], mesh["expert"]
  if seq > 1:
    _one_of(cfg.context_parallel, context.IMPLS,
            "config.model.context_parallel")
    key = "config.data.seq_len"
    length = (pipeline.seq_len(config) if task == "lm"
              else config.data.get("seq_len", 0))
    # Causal attention is load-balanced with the zig-zag layout: 2 chunks
    # per device (lm/parallel/context.py).
    ways = 2 * seq if cfg.causal else seq
    _require(length % ways == 0,
             f"{key}={length} (0 = config.model.max_len) is not divisible by "
             f"{'2 x ' if cfg.causal else ''}config.mesh.sequence = {ways}: "
             + ("the zig-zag layout gives each device two equal chunks. "
                if cfg.causal else "each device holds an equal chunk. ")
             + f"Use a multiple of {ways}.")
  if stage > 1:
    _require(cfg.scan_layers,
             f"config.mesh.stage={stage} needs config.model.scan_layers=True:"
             " the pipeline splits the stacked layer axis over stages.")
    _require(cfg.n_layers % stage == 0,
             f"config.model.n_layers={cfg.n_layers} is not divisible by "
             f"config.mesh.stage={stage}: each stage holds the same number "
             "of layers. Change n_layers or the number of stages.")
    micro = config.train.get("microbatches", 1)
    per_step = config.train.batch_size // config.train.get(
        "grad_accum_steps", 1)
    shards = mesh_lib.batch_divisor(mesh)
    _require(micro >= 1 and per_step % (micro * shards) == 0,
             f"config.train.batch_size={config.train.batch_size} (per "
             f"accumulation step {per_step}) is not divisible by "
             f"config.train.microbatches={micro} x the {shards} batch "
             "shards: every pipeline microbatch is split evenly over the "
             f"data axes. Use a batch size that is a multiple of "
             f"{micro * shards}, or fewer microbatches.")
  moe = cfg.moe
  if moe.experts:
    _require(task == "lm", "config.model.moe.experts > 0: mixture-of-experts"
             " layers are for the LM (config.task='lm').")
    _require(moe.experts % expert == 0,
             f"config.model.moe.experts={moe.experts} is not divisible by "
             f"config.mesh.expert={expert}: each expert shard holds the same "
             "number of experts. Change one of them.")
    _require(1 <= moe.top_k <= moe.experts,
             f"config.model.moe.top_k={moe.top_k} must be between 1 and "
             f"config.model.moe.experts={moe.experts}.")
    _require(moe.capacity_factor > 0,
             f"config.model.moe.capacity_factor={moe.capacity_factor} must "
             "be positive.")
    _require(stage == 1, "config.model.moe with config.mesh.stage > 1: the "
             "pipeline does not carry the MoE auxiliary losses yet; use "
             "stage=1.")
    _require(quant.mode(config) == "none", "config.model.moe with "
             "config.quant.mode: QAT of the expert layers is not supported; "
             "set config.quant.mode='none'.")
    _require(not distill.enabled(config), "config.model.moe with "
             "config.distill.teacher_workdir: the distillation loss does not "
             "include the MoE auxiliary losses yet; train without a teacher.")
  else:
    _require(expert == 1 or task == "lm",
             f"config.mesh.expert={expert}: only the LM has expert layers.")


def _grad_reduce(config, task: str) -> None:
  mode = config.train.get("grad_reduce", "auto")
  dtype = config.train.get("grad_reduce_dtype", "float32")
  _one_of(mode, reduce_lib.MODES, "config.train.grad_reduce")
  _one_of(dtype, reduce_lib.DTYPES, "config.train.grad_reduce_dtype")
  _require(mode == "auto" or task != "gan",
           f"config.train.grad_reduce={mode!r}: the GAN step updates two "
           "networks in turn; use 'auto'.")
  # A shard_map manual over `data` with fsdp/tensor left automatic makes
  # XLA's SPMD partitioner abort the process (jax 0.10.2), so the explicit
  # reduction is for pure data parallelism for now.
  others = [a for a in mesh_lib.AXES
            if a != "data" and config.mesh.get(a, 1) != 1]
  if mode != "auto" and others:
    raise ConfigError(
        f"config.train.grad_reduce={mode!r} needs config.mesh.{others[0]}=1:"
        " the explicit reduction is for pure data parallelism (every other "
        "mesh axis 1); use 'auto' with FSDP, tensor, sequence, stage or "
        "expert parallelism.")
  # XLA:CPU aborts the process (not an exception) compiling a bfloat16
  # all-reduce, so this cannot be probed; it is refused up front.
  _require(mode == "auto" or dtype == "float32"
           or jax.default_backend() != "cpu",
           "config.train.grad_reduce_dtype='bfloat16': XLA:CPU cannot "
           "compile bfloat16 all-reduces; use 'float32' on CPU (bfloat16 "
           "communication is for GPU/TPU).")


def _compression(config, cfg, task: str) -> None:
  """QAT, pruning and distillation (each off unless its config asks)."""
  try:
    quant.check(config)
  except quant.QuantError as e:
    raise ConfigError(str(e)) from None
  quantized = quant.mode(config) != "none"
  pruned = config.get("prune", None) and config.prune.get("sparsity", 0.0)
  if quantized or pruned:
    # Tracing the abstract model finds patterns that match nothing.
    try:
      quantizer = ((lambda m, x: quant.quantize(m, config.quant, x))
                   if quantized else None)
      model = state_lib.abstract_model(cfg, config.model.name, quantizer)
    except quant.QuantError as e:
      raise ConfigError(str(e)) from None
  if pruned:
    _require(task != "gan" or not config.prune.get("layers", ()),
             "config.prune.layers: the GAN prunes each network's matrices; "
             "leave it empty.")
    try:
      prune.from_config(config.prune, config.train.steps)
      prune.check_patterns(tuple(config.prune.get("layers", ())),
                           nnx.to_pure_dict(nnx.state(model)))
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if distill.enabled(config):
    _teacher(config, cfg, task)


def _teacher(config, cfg, task: str) -> None:
  d = config.distill
  where = f"config.distill.teacher_workdir={d.teacher_workdir!r}"
  _require(task in ("lm", "classify"),
           f"{where}: distillation covers the LM and the classifiers, not "
           f"config.task={task!r}.")
  _require(0.0 <= d.get("alpha", 0.5) <= 1.0,
           f"config.distill.alpha={d.alpha} must be in [0, 1].")
  _require(d.get("temperature", 1.0) > 0,
           f"config.distill.temperature={d.temperature} must be positive.")
  path = paths.resolve(d.teacher_workdir) / "config.json"
  _require(path.exists(), f"{where}: {path} does not exist; point it at a "
           "run directory written by scripts/train.py.")
  checkpoints = paths.resolve(d.teacher_workdir) / "checkpoints"
  _require(checkpoints.is_dir() and any(
      p.name.isdigit() for p in checkpoints.iterdir()),
           f"{where} has no checkpoint in {checkpoints}; train the teacher "
           "first.")
  teacher = ml_collections.ConfigDict(json.loads(path.read_text()))
  _require(teacher.get("task", "lm") == task,
           f"{where} trained config.task={teacher.get('task', 'lm')!r}, the "
           f"student trains {task!r}; use a teacher of the same task.")
  _require(not teacher.get("serving", None),
           f"{where} is an int8 serving model; use the training run.")
  try:
    teacher_cfg = models.model_config(teacher)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{where}: {e}") from None
  if task == "lm":
    for key in ("vocab_size",):
      _require(getattr(teacher_cfg, key) == getattr(cfg, key),
               f"{where}: the teacher's model.{key}="
               f"{getattr(teacher_cfg, key)} differs from the student's "
               f"{getattr(cfg, key)}; their logits must cover the same "
               "vocabulary. Use a teacher trained with the same "
               "tokenizer and vocab_size.")
    _require(teacher.data.tokenizer == config.data.tokenizer,
             f"{where}: the teacher's data.tokenizer="
             f"{teacher.data.tokenizer!r} differs from the student's "
             f"{config.data.tokenizer!r}.")
    _require(teacher_cfg.max_len >= pipeline.seq_len(config),
             f"{where}: the teacher's model.max_len={teacher_cfg.max_len} is "
             f"shorter than the student's training windows "
             f"({pipeline.seq_len(config)} tokens); lower config.data.seq_len."
             )
  else:
    _require(teacher.data.dataset == config.data.dataset,
             f"{where}: the teacher classified {teacher.data.dataset!r}, the "
             f"student {config.data.dataset!r}; use a teacher of the same "
             "dataset.")
    _require(teacher_cfg.num_classes == cfg.num_classes,
             f"{where}: the teacher's model.num_classes="
             f"{teacher_cfg.num_classes} differs from the student's "
             f"{cfg.num_classes}.")


def _transformer(cfg, mesh: dict[str, int]) -> None:
  _one_of(cfg.remat, layers.REMAT_POLICIES, "config.model.remat")
  _one_of(cfg.mlp, ("swiglu", "gelu"), "config.model.mlp")
  _one_of(cfg.attention_impl, attention.BACKENDS,
          "config.model.attention_impl")
  # Known choices this backend cannot run: an error, never a silent fallback.
  backend = jax.default_backend()
  for key, value, choices, needs in (
      ("remat", cfg.remat, layers.REMAT_POLICIES, layers.REMAT_BACKENDS),
      ("attention_impl", cfg.attention_impl, attention.BACKENDS,
       attention.BACKENDS)):
    here = [c for c in choices if backend in needs.get(c, (backend,))]
    _require(value in here,
             f"config.model.{key}={value!r} needs a "
             f"{' or '.join(needs.get(value, ()))} backend; this one is "
             f"{backend}. Use one of {here}.")
  _one_of(cfg.einsum_grad, layers.EINSUM_GRADS, "config.model.einsum_grad")
  # Model shapes.
  for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
              "vocab_size", "max_len", "attention_chunks"):
    _require(getattr(cfg, key) > 0, f"config.model.{key}={getattr(cfg, key)} "
             "must be positive.")
  _require(cfg.n_heads % cfg.n_kv_heads == 0,
           f"config.model.n_heads={cfg.n_heads} is not a multiple of "
           f"config.model.n_kv_heads={cfg.n_kv_heads}: grouped-query attention"
           " shares each kv head among n_heads/n_kv_heads query heads.")
  _require(cfg.head_dim or cfg.d_model % cfg.n_heads == 0,
           f"config.model.d_model={cfg.d_model} is not divisible by "
           f"config.model.n_heads={cfg.n_heads}; change one, or set "
           "config.model.head_dim.")
  _require(cfg.k % 2 == 0, f"head dim {cfg.k} must be even for RoPE; set "
           "config.model.head_dim or change d_model/n_heads.")

  # Mesh vs shapes.
  t, f = mesh["tensor"], mesh["fsdp"]
  for key in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
    value = getattr(cfg, key)
    _require(value % t == 0,
             f"config.model.{key}={value} is not divisible by "
             f"config.mesh.tensor={t}: tensor parallelism splits it evenly. "
             f"Pick a tensor size that divides it, or change {key}.")
  _require(cfg.d_model % f == 0,
           f"config.model.d_model={cfg.d_model} is not divisible by "
           f"config.mesh.fsdp={f}: FSDP splits every weight's d_model axis.")



def _image_shape(config, cfg) -> None:
  dataset = config.data.get("dataset", "")
  _one_of(dataset, images.DATASETS, "config.data.dataset")
  expected = tuple(images.IMAGE_SHAPES[dataset])
  _require(tuple(cfg.image_shape) == expected,
           f"config.model.image_shape={tuple(cfg.image_shape)} does not fit "
           f"config.data.dataset={dataset!r}, whose images are {expected}; "
           f"set config.model.image_shape={expected}.")
  for key in ("max_shift", "max_rotation"):
    _require(config.data.get(key, 0) >= 0, f"config.data.{key} must be >= 0.")


def _classify_data(config, cfg) -> None:
  dataset = config.data.get("dataset", "")
  _one_of(dataset, classify.DATASETS, "config.data.dataset")
  text = dataset in classify.TEXT_DATASETS
  want = "transformer_classifier" if text else "mlp"
  _require(config.model.name == want,
           f"config.data.dataset={dataset!r} is classified by "
           f"config.model.name={want!r}, not {config.model.name!r}.")
  num_classes = len(genres.GENRES) if text else images.NUM_CLASSES
  _require(cfg.num_classes == num_classes,
           f"config.model.num_classes={cfg.num_classes} differs from the "
           f"{num_classes} labels of config.data.dataset={dataset!r}; set "
           f"config.model.num_classes={num_classes}.")
  if text:
    _tokens(config, cfg, config.data.get("seq_len", 0))
  else:
    _image_shape(config, cfg)


def _gan_data(config, cfg) -> None:
  _image_shape(config, cfg)
  accum = config.train.get("grad_accum_steps", 1)
  _require(accum == 1, f"config.train.grad_accum_steps={accum}: the GAN step "
           "updates two networks in turn on the whole batch; set it to 1.")


def _tokens(config, cfg, seq_len: int) -> None:
  _one_of(config.data.tokenizer, tokenizer_lib.TOKENIZERS,
          "config.data.tokenizer")
  vocab = tokenizer_lib.get(config.data.tokenizer).vocab_size
  _require(cfg.vocab_size >= vocab,
           f"config.model.vocab_size={cfg.vocab_size} is smaller than the "
           f"{config.data.tokenizer!r} tokenizer's {vocab} tokens.")
  _require(0 < seq_len <= cfg.max_len,
           f"config.data.seq_len={seq_len} must be positive and at most the "
           f"model's positional limit config.model.max_len={cfg.max_len}; "
           "lower seq_len or raise max_len.")


def _lm_data(config, cfg) -> None:
  _one_of(config.data.corpus, pipeline.CORPORA, "config.data.corpus")
  _tokens(config, cfg, pipeline.seq_len(config))
  if config.data.corpus == "text_dir":
    try:
      sources.text_dir_files(config.data.text_dir)
    except sources.DataError as e:
      raise ConfigError(str(e)) from None
