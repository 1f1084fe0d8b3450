"""The base config: every key the code reads, with its default.

Presets (configs/*.py) start from `base(family)` and change what their
experiment needs; `--config.section.key=value` overrides any key that is
here. `resolve` turns any config (a preset, a run's config.json, a dict
built in Python) into a complete one: the base for its model family with the
given values on top, and an error naming the key and the nearest valid one
for a key the base does not have. After it, code reads every key directly.

The `config.model` keys of a family are the fields of its frozen `Config`
dataclass (lm/models/<family>.py), with the defaults written there.
"""
from __future__ import annotations

import copy

import ml_collections

from lm import checks, models

# What a family is trained by when the config does not say (config.task).
DEFAULT_TASK = {"transformer": "lm", "transformer_classifier": "classify",
                "mlp": "classify", "gan": "gan"}

_LM_DATA = dict(
    corpus="shakespeare",  # shakespeare | python_stdlib | text_dir.
    text_dir="",  # corpus=text_dir: a directory of .txt files (>= 3).
    data_dir="",  # tfds data dir; "" = $LM_DATA_DIR or ~/.cache/lm/...
    # byte | a tokenizer.json | a SentencePiece .model (lm/data/tokenizer.py).
    tokenizer="byte",
    seq_len=0,  # Training window; 0 = config.model.max_len.
    # concat: windows cut from the documents joined by EOS (attention
    # crosses documents) | segments: documents packed into windows with
    # segment ids; attention and RoPE positions restart at each document.
    packing="concat",
    # config.task=sft: supervised fine-tuning data (lm/data/sft.py).
    sft=dict(
        # JSON Lines of {"prompt", "response"} or {"messages": [{"role",
        # "content"}, ...]}, or "shakespeare_dialogue" (built offline from
        # the plays into the data dir).
        train="", eval="",
        # A {"prompt", "response"} record: template.format(prompt=...),
        # then the response and EOS; the loss is on the response and EOS.
        template="{prompt}",
        # A "messages" record: each message as message_template.format(
        # role=..., content=...), then EOS; the loss is on the assistant
        # messages and EOS. chat_template=tokenizer renders them with the
        # tokenizer's own chat template (tokenizer_config.json or
        # chat_template.jinja beside config.data.tokenizer) instead.
        message_template="<|{role}|>\n{content}\n",
        chat_template="config",  # config | tokenizer.
        # A record longer than the window: truncate (keep its first
        # seq_len + 1 tokens) | drop. Counted and reported either way.
        too_long="truncate"))
_IMAGE_DATA = dict(
    dataset="digits",  # digits | mnist.
    data_dir="",
    augment=False,  # Random shifts and small rotations of training images.
    max_shift=0,  # Pixels.
    max_rotation=0.0)  # Degrees.
_PASSAGE_DATA = dict(
    dataset="shakespeare_genres",
    data_dir="",
    tokenizer="byte",
    seq_len=256,  # Passage length in tokens (<= config.model.max_len).
    balance_classes=True)  # Sample the classes equally in training.
DATA = {"transformer": _LM_DATA, "transformer_classifier": _PASSAGE_DATA,
        "mlp": _IMAGE_DATA, "gan": _IMAGE_DATA}

# Written by scripts/quantize.py into an int8 serving run's config.
SERVING = dict(weights="int8", activations="int8", source_mode="none",
               source_workdir="")


def base(family: str = "transformer") -> ml_collections.ConfigDict:
  """Every key, at its default, for a model of `family`."""
  checks.one_of(family, models.MODELS, "config.model.name")
  c = ml_collections.ConfigDict()
  c.seed = 0  # Parameter init and the per-step keys (dropout, GAN latents).
  c.task = DEFAULT_TASK[family]  # lm | classify | gan (lm/tasks).
  c.model = models.defaults(family)
  # Device mesh; one axis may be -1 (all remaining devices). Each axis is a
  # strategy (lm/parallel/rules.py): data, stage (GPipe pipeline), fsdp
  # (ZeRO-3), expert (MoE experts; a data axis elsewhere), sequence (ring
  # attention), tensor (Megatron).
  c.mesh = dict(data=-1, stage=1, fsdp=1, expert=1, sequence=1, tensor=1)
  # Of each axis, how many slices it spans (TPU multislice: the data-center
  # network between slices; elsewhere each process counts as a slice). Only
  # `data` (and `stage`) should: e.g. --config.mesh_dcn.data=4 on 4 slices.
  c.mesh_dcn = dict(data=1, stage=1, fsdp=1, expert=1, sequence=1, tensor=1)
  c.precision = dict(
      compute_dtype="float32",  # float32 | bfloat16 | float16 (loss scaling).
      param_dtype="float32",  # float32 | bfloat16: params and optimizer state.
      # bfloat16 on a CPU: how matmuls run. native: bfloat16 operands into a
      # float32 accumulator (fast where the CPU has AVX512-BF16 or AMX);
      # float32: operands widened to float32 first (a float32 GEMM: for
      # CPUs without them); auto: native iff the CPU has them. Ignored on
      # GPU/TPU and for other compute dtypes (lm/models, model_config).
      cpu_bf16_dots="auto",
      # float16 only (lm/train/precision.py): the starting scale, doubled
      # after `growth_interval` finite steps, halved on each overflow (not
      # below min_scale).
      loss_scale=dict(initial=2.0 ** 15, growth_interval=2000, factor=2.0,
                      min_scale=1.0))
  c.optimizer = dict(
      name="adamw",  # adamw | adafactor | lion | sgd | momentum | adagrad.
      learning_rate=1e-3,  # Peak, after warmup.
      schedule="cosine",  # constant | cosine | linear (after warmup).
      warmup_steps=0,
      end_learning_rate_fraction=0.0,  # Of the peak, at the last step.
      weight_decay=0.0,  # Decoupled; masked off vectors (norms, biases).
      grad_clip_norm=0.0,  # Global norm; 0 = no clipping.
      b1=0.9, b2=0.95,  # adamw and lion.
      eps=1e-8,  # adamw and adagrad.
      decay_rate=0.8, clipping_threshold=1.0,  # adafactor.
      momentum=0.9, nesterov=False,  # momentum.
      initial_accumulator_value=0.1)  # adagrad.
  c.train = dict(
      steps=1000,
      batch_size=32,  # Global, over all devices and processes.
      grad_accum_steps=1,  # Microbatches per step (same math, less memory).
      # GPipe microbatches per (accumulation) step when mesh.stage > 1: the
      # bubble is (stages - 1) / (microbatches + stages - 1).
      microbatches=1,
      # auto: XLA inserts the gradient all-reduce; psum | reduce_scatter: an
      # explicit shard_map reduction over `data` (lm/parallel/reduce.py).
      grad_reduce="auto",
      grad_reduce_dtype="float32",  # float32 | bfloat16 (GPU/TPU only).
      log_every=20,
      eval_every=200,  # 0 = no evals.
      eval_batches=8,  # LM: fixed validation batches per eval.
      checkpoint_every=200,  # 0 = only at the end (and on SIGTERM).
      max_checkpoints=3,
      # A run directory whose latest parameters a new run starts from (a
      # fresh optimizer, step 0): fine-tuning, e.g. an imported model
      # (scripts/import_hf.py). Ignored when the workdir has a checkpoint.
      init_from="",
      # (start, stop): a jax.profiler trace of the steps from `start` done
      # to `stop` done, e.g. (10, 13): three steps, into
      # WORKDIR/tensorboard/plugins/profile/ (docs/tracking.md); () = off.
      profile_steps=())
  c.data = copy.deepcopy(DATA[family])
  # Quantization-aware training, distillation and magnitude pruning: all off
  # by default; presets name the layers to quantize and prune.
  c.quant = dict(
      mode="none",  # none | int8 | int4_weights | fp8 | int4 (TPU/GPU).
      layers=(),  # Module-path regexes, e.g. ".*blocks/.*mlp/up".
      activations="int8",  # int4_weights only: int8 | float.
      backward="none")  # none | int8 | fp8: quantized gradients too.
  c.distill = dict(
      teacher_workdir="",  # A finished run of the same task; "" = off.
      temperature=2.0,  # Softens both distributions.
      alpha=0.5)  # loss = alpha * hard-label CE + (1 - alpha) * T^2 KL.
  c.prune = dict(
      sparsity=0.0,  # Final fraction of zeros per pruned layer; 0 = off.
      begin_step=0,
      end_step=0,  # 0 = 75% of config.train.steps (then fine-tune).
      update_every=10,  # Steps between mask updates.
      layers=())  # Parameter-path regexes (".../kernel"); () = every matrix.
  # LoRA / QLoRA fine-tuning of the run in config.train.init_from
  # (lm/train/lora.py): only low-rank adapters on `layers` are trained.
  c.lora = dict(
      rank=0,  # The adapters' rank; 0 = off.
      alpha=16.0,  # The adapters' update is scaled by alpha / rank.
      layers=(),  # Module-path regexes, e.g. ".*blocks/.*attn/q".
      dropout=0.0,  # On the adapters' inputs, in training.
      base_quant="none")  # none | int8 | int4 (QLoRA): the frozen base.
  # Where metrics go besides metrics.jsonl, TensorBoard and the console
  # (lm/run/wandb_sink.py, docs/tracking.md).
  c.log = dict(
      wandb=False,  # Weights & Biases: the config, metrics, eval images.
      wandb_mode="offline",  # offline (files in WORKDIR/wandb) | online.
      wandb_project="lm",
      wandb_entity="",  # "" = your default entity.
      wandb_name="",  # "" = the workdir's name.
      wandb_tags=())
  # Differential privacy, DP-SGD (lm/train/privacy.py, docs/privacy.md): on
  # when noise_multiplier or target_epsilon is > 0. Each example's gradient
  # is clipped to clip_norm, the sum gets Gaussian noise of std
  # noise_multiplier * clip_norm, divided by config.train.batch_size (the
  # expected batch under Poisson sampling).
  c.privacy = dict(
      noise_multiplier=0.0,  # 0 with target_epsilon > 0: calibrated to it.
      clip_norm=1.0,  # L2 norm each example's gradient is clipped to.
      delta=1e-5,  # Epsilon is reported at this delta (< 1 / examples).
      # > 0: the budget. With noise_multiplier: training stops (checkpoint)
      # before the step that would exceed it; without: the noise multiplier
      # that spends it in config.train.steps.
      target_epsilon=0.0,
      # poisson: each example joins each step's batch with probability
      # batch_size / examples (what the accountant assumes) | shuffle: the
      # task's shuffled fixed batches, accounted as if Poisson (docs).
      sampling="poisson",
      accountant="rdp")  # rdp | pld (dp-accounting).
  if family == "gan":
    c.gan = dict(r1_gamma=0.0)  # R1 penalty on real images; 0 = off.
  return c


def resolve(config) -> ml_collections.ConfigDict:
  """A complete config: `base` of the config's model family with every value
  of `config` on top. Raises ConfigError for a key the base does not have,
  naming the nearest one."""
  values = (config.to_dict() if isinstance(config, ml_collections.ConfigDict)
            else copy.deepcopy(dict(config)))
  family = values.get("model", {}).get("name", "transformer")
  out = base(family).to_dict()
  if "serving" in values:
    out["serving"] = dict(SERVING)
  _merge(out, values, "config")
  return ml_collections.ConfigDict(out)


def _merge(into: dict, values: dict, where: str) -> None:
  for key, value in values.items():
    if key not in into:
      near = checks.nearest(key, into)
      raise checks.ConfigError(
          f"{where}.{key} is unknown"
          + (f"; did you mean {where}.{near}?" if near
             else f"; the keys of {where} are {sorted(into)}."))
    if isinstance(into[key], dict):
      checks.require(isinstance(value, dict),
                     f"{where}.{key} is a section ({sorted(into[key])}); "
                     f"set its keys, e.g. {where}.{key}."
                     f"{next(iter(into[key]), 'x')}=...")
      _merge(into[key], value, f"{where}.{key}")
    else:
      into[key] = value
