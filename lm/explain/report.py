"""A run directory and a request -> the request checked (before anything is
restored or compiled), the explanations computed on the run's parameters,
the files written, and the lines the script prints.

Per family (`config.model.name`):
  transformer (LM, SFT)    attention maps of --text; integrated gradients of
                           the next token's log-prob at --position
  transformer_classifier   attention maps of --text; integrated gradients of
                           the --target_class logit (default: the predicted)
  mlp                      integrated gradients of the --target_class logit
                           (default: each image's predicted class) over the
                           pixels of the first --num_images test images
Baselines: the end-of-document token's embedding at every position (text;
not the zero embedding, see targets.py), a black image (pixels; -1 after
normalization). The GAN has neither a class nor a next
token to attribute, and is refused.

Files, in --out (default WORKDIR/explain): attention_layer_<i>.png and
attention.npz (probs per layer, H x L x L, and the token ids);
attributions.png, attributions.html (text) and attributions.json (the
numbers, the target, and the completeness gap).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import paths
from lm.checks import UsageError
from lm.data import images as images_lib, tokenizer as tokenizer_lib
from lm.explain import attention_maps, integrated_gradients as ig_lib
from lm.explain import render, targets
from lm.parallel import rules as rules_lib
from lm.run import restore

METHODS = ("attention", "ig")
SUPPORTED = {"transformer": METHODS, "transformer_classifier": METHODS,
             "mlp": ("ig",)}
TEXT_BASELINE = "the end-of-document token at every position"
IMAGE_BASELINE = "a black image (every pixel -1)"


@dataclasses.dataclass(frozen=True)
class Request:
  methods: tuple[str, ...] = ()  # () = every method the family has.
  text: str = "ROMEO.\nBut soft, what light through yonder window breaks?"
  position: int = -1  # LM: the position whose next token is attributed.
  target_class: int = -1  # Classifiers: -1 = the predicted class.
  num_images: int = 8  # MLP: the first test images.
  steps: int = ig_lib.DEFAULT_STEPS
  rule: str = ig_lib.DEFAULT_RULE
  batch_size: int = 0  # Path points per forward pass; 0 = all.
  mesh: str | None = None  # --mesh; None: the training mesh if it fits.
  out: str | None = None  # None: WORKDIR/explain.


@dataclasses.dataclass(frozen=True)
class Checked:
  """What check() found: the run's config, the methods to run, the text's
  token ids (text families) and the mesh argument for restore.load."""
  config: object
  methods: tuple[str, ...]
  tokens: np.ndarray | None
  mesh: str | None


def check(workdir: str, request: Request) -> Checked:
  """Every mistake in the request or the run directory, as a UsageError
  naming the flag (or file) and the fix; reads config.json only."""
  config = restore.load_config(workdir)  # A missing file: an OSError.
  family = config.model.name
  if restore.is_serving_dir(workdir):
    raise UsageError(f"--workdir={workdir} holds an int8 serving model "
                     "(scripts/quantize.py); explain the float run it was "
                     "made from.")
  if family not in SUPPORTED:
    raise UsageError(
        f"--workdir={workdir} holds a {family} run (config.model.name="
        f"{family!r}); explain.py supports language models (transformer), "
        "text classifiers (transformer_classifier) and image MLPs (mlp): a "
        "GAN has no class or next token to attribute.")
  unknown = [m for m in request.methods if m not in METHODS]
  if unknown:
    raise UsageError(f"--methods={','.join(request.methods)}: {unknown[0]!r} "
                     f"is unknown; use any of {','.join(METHODS)}.")
  methods = request.methods or SUPPORTED[family]
  if "attention" in methods and "attention" not in SUPPORTED[family]:
    raise UsageError(
        f"--methods={','.join(methods)}: the {family} family has no "
        "attention layers to map; use --methods=ig (integrated-gradients "
        "pixel attributions).")
  if request.rule not in ig_lib.RULES:
    raise UsageError(f"--rule={request.rule!r} is unknown; use one of "
                     f"{ig_lib.RULES}.")
  if request.steps < 2:
    raise UsageError(f"--steps={request.steps}: integrated gradients needs "
                     f"at least 2 (default {ig_lib.DEFAULT_STEPS}).")
  if request.batch_size < 0:
    raise UsageError(f"--batch_size={request.batch_size} must be >= 0 "
                     "(0: every step at once).")
  mesh = request.mesh
  sizes = restore.parse_mesh(mesh) if mesh else dict(config.mesh)
  if sizes.get("sequence", 1) > 1 or sizes.get("stage", 1) > 1:
    if mesh:
      raise UsageError(f"--mesh={mesh}: explain.py runs the layers one at a "
                       "time, without context or pipeline parallelism; drop "
                       "the sequence and stage axes.")
    mesh = "1,-1,1"  # The training mesh had them: FSDP over every device.
  tokens = None
  if family == "mlp":
    if request.num_images < 1:
      raise UsageError(f"--num_images={request.num_images} must be >= 1.")
  else:
    tokens = np.asarray(tokenizer_lib.get(config.data.tokenizer).encode(
        request.text), np.int32)
    if not tokens.size:
      raise UsageError("--text must not be empty.")
    if tokens.size > config.model.max_len:
      raise UsageError(
          f"--text is {tokens.size} tokens, longer than the model's context "
          f"(config.model.max_len={config.model.max_len}); shorten it.")
    if family == "transformer" and not (
        -tokens.size <= request.position < tokens.size):
      raise UsageError(
          f"--position={request.position} is outside the text's "
          f"{tokens.size} tokens; use 0..{tokens.size - 1} (or -1, the "
          "last).")
  if family != "transformer":
    classes = config.model.num_classes
    if not -1 <= request.target_class < classes:
      raise UsageError(f"--target_class={request.target_class}: use 0.."
                       f"{classes - 1}, or -1 for the predicted class.")
  if restore.latest_step_on_disk(workdir) is None:
    raise UsageError(
        f"--workdir={workdir} has no checkpoint in "
        f"{paths.resolve(workdir) / 'checkpoints'}: train the run first "
        "(scripts/train.py saves one at the end).")
  return Checked(config=config, methods=tuple(methods), tokens=tokens,
                 mesh=mesh)


def explain(workdir: str, request: Request) -> list[str]:
  """Checks, restores the latest checkpoint, computes and writes every
  requested explanation; returns the lines to print."""
  checked = check(workdir, request)
  out = paths.resolve(request.out or Path(paths.resolve(workdir), "explain"))
  out.mkdir(parents=True, exist_ok=True)
  # One text or a few images: replicate the batch, keep the parameters
  # sharded as in training (as scripts/generate.py does).
  with rules_lib.use(dataclasses.replace(rules_lib.Rules(), batch=None)):
    loaded = restore.load(workdir, checked.mesh)
    with jax.set_mesh(loaded.setup.mesh):
      lines = [f"[step {loaded.step}, mesh {dict(loaded.setup.mesh.shape)}]"]
      if checked.config.model.name == "mlp":
        lines += _images(loaded, request, out)
      else:
        lines += _text(loaded, checked, request, out)
  return lines


def _text(loaded, checked: Checked, request: Request, out: Path
          ) -> list[str]:
  config, graphdef = loaded.config, loaded.setup.graphdef
  tok = tokenizer_lib.get(config.data.tokenizer)
  ids_L = checked.tokens
  labels = render.token_labels(tok, ids_L)
  tokens_1xL = jnp.asarray(ids_L[None])
  lines = []
  if "attention" in checked.methods:
    probs = jax.device_get(jax.jit(
        lambda p, t: attention_maps.maps(nnx.merge(graphdef, p), t))(
            loaded.params, tokens_1xL))
    for layer, probs_1xHxLxL in enumerate(probs):
      render.attention_png(probs_1xHxLxL[0], labels, layer,
                           out / f"attention_layer_{layer}.png")
    np.savez(out / "attention.npz", tokens=ids_L,
             **{f"layer_{i}": p[0] for i, p in enumerate(probs)})
    lines.append(f"attention maps: {len(probs)} layers x "
                 f"{probs[0].shape[1]} heads over {len(ids_L)} tokens -> "
                 f"{out}/attention_layer_*.png, attention.npz")
  if "ig" in checked.methods:
    lines += _text_attributions(loaded, request, ids_L, labels, out)
  return lines


def _text_attributions(loaded, request: Request, ids_L, labels, out: Path
                       ) -> list[str]:
  config, graphdef = loaded.config, loaded.setup.graphdef
  lm = config.model.name == "transformer"
  L = len(ids_L)
  position = request.position % L
  tokens_1xL = jnp.asarray(ids_L[None])

  @jax.jit
  def predict(params, tokens_1xL):
    model = nnx.merge(graphdef, params)
    if lm:
      logits_V = model(tokens_1xL)[0][0, position]
      return jax.nn.log_softmax(logits_V)
    return jax.nn.log_softmax(model(tokens_1xL)[0])

  log_probs = np.asarray(jax.device_get(predict(loaded.params, tokens_1xL)))
  if lm:
    # The text's own next token; after the text's end, the model's pick.
    target = (int(ids_L[position + 1]) if position + 1 < L
              else int(np.argmax(log_probs)))
    target_name = render.token_labels(
        tokenizer_lib.get(config.data.tokenizer), [target])[0]
    what = (f"log p({render.quoted(target_name)} | the tokens up to "
            f"position {position} {render.quoted(labels[position])})")
    picked = "" if position + 1 < L else " (the model's most likely)"
  else:
    target = (request.target_class if request.target_class >= 0
              else int(np.argmax(log_probs)))
    target_name = _class_names(config)[target]
    what = f"the logit of class {target} ({target_name})"
    picked = (f" (predicted: {_class_names(config)[int(np.argmax(log_probs))]}"
              f", p = {np.exp(log_probs.max()):.3f})")

  baseline_id = tokenizer_lib.get(config.data.tokenizer).eos_id

  @jax.jit
  def attribute(params, tokens_1xL):
    model = nnx.merge(graphdef, params)
    x_LxD = model.transformer.embed(tokens_1xL)[0]
    baseline_LxD = model.transformer.embed(
        jnp.full_like(tokens_1xL, baseline_id))[0]
    f = (targets.lm_log_prob(model, position, target) if lm
         else targets.classifier_logit(model, target))
    return ig_lib.integrated_gradients(
        f, x_LxD, baseline_LxD, steps=request.steps, rule=request.rule,
        batch_size=request.batch_size)

  res = ig_lib.result(*attribute(loaded.params, tokens_1xL))
  per_token_L = res.attributions.sum(axis=-1)  # Over the embedding.
  summary = _summary(what + picked, res, request, TEXT_BASELINE)
  header = [f"step {loaded.step}: integrated gradients of {what}{picked}",
            f"f(x) {res.score:.4f}, f(baseline) {res.baseline_score:.4f}, "
            f"completeness gap {res.gap:+.2e} ({request.steps} steps)"]
  render.text_png(labels, per_token_L, header, out / "attributions.png")
  render.text_html(labels, per_token_L, header, out / "attributions.html")
  _write_json(out / "attributions.json", request, res, TEXT_BASELINE,
              target={"position": position, "token": target,
                      "text": target_name} if lm
              else {"class": target, "name": target_name},
              tokens=labels, token_ids=[int(i) for i in ids_L],
              attributions=[float(a) for a in per_token_L])
  return [summary, f"token attributions -> {out}/attributions.png, "
          "attributions.html, attributions.json"]


def _class_names(config) -> list[str]:
  if config.data.dataset == "shakespeare_genres":
    from lm.data.genre_builder import GENRES  # noqa: PLC0415
    return list(GENRES)
  return [str(c) for c in range(config.model.num_classes)]


def _images(loaded, request: Request, out: Path) -> list[str]:
  config, graphdef = loaded.config, loaded.setup.graphdef
  images_u8, labels_N = images_lib.load_split(config.data, "test")
  n = min(request.num_images, len(labels_N))
  images_NxHxWxC = images_lib.normalize(images_u8[:n], config.data.dataset)
  baseline = np.float32(images_lib.BACKGROUND)

  @jax.jit
  def predict(params, images_NxHxWxC):
    return jnp.argmax(nnx.merge(graphdef, params)(images_NxHxWxC), axis=-1)

  @jax.jit
  def attribute(params, image_HxWxC, target):
    f = targets.image_logit(nnx.merge(graphdef, params), target)
    return ig_lib.integrated_gradients(
        f, image_HxWxC, jnp.full_like(image_HxWxC, baseline),
        steps=request.steps, rule=request.rule,
        batch_size=request.batch_size)

  predicted_N = np.asarray(jax.device_get(predict(loaded.params,
                                                  images_NxHxWxC)))
  results, titles, records = [], [], []
  for image, label, predicted in zip(images_NxHxWxC, labels_N, predicted_N):
    target = (request.target_class if request.target_class >= 0
              else int(predicted))
    res = ig_lib.result(*attribute(loaded.params, image, target))
    results.append(res)
    titles.append((f"label {label}, predicted {predicted}",
                   f"IG, class {target} (gap {100 * res.relative_gap:.2g}%)"))
    records.append({"label": int(label), "predicted": int(predicted),
                    "target_class": target, "score": res.score,
                    "baseline_score": res.baseline_score, "gap": res.gap,
                    "relative_gap": res.relative_gap,
                    "attributions": res.attributions.tolist()})
  render.images_png(images_NxHxWxC, np.stack([r.attributions
                                              for r in results]),
                    titles, out / "attributions.png")
  (out / "attributions.json").write_text(json.dumps({
      "method": "integrated_gradients", "rule": request.rule,
      "steps": request.steps, "baseline": IMAGE_BASELINE,
      "score": "the target class's logit", "images": records}, indent=1)
      + "\n")
  worst = max(results, key=lambda r: r.relative_gap)
  return [f"integrated gradients ({request.rule}, {request.steps} steps; "
          f"baseline: {IMAGE_BASELINE}) of the class logit over the pixels "
          f"of {n} test images; largest completeness gap (convergence "
          f"delta) {worst.gap:+.3g} ({100 * worst.relative_gap:.3g}% of "
          "f(x) - f(baseline))",
          f"pixel attributions -> {out}/attributions.png, attributions.json"]


def _summary(what: str, res: ig_lib.Result, request: Request,
             baseline: str) -> str:
  return (f"integrated gradients ({request.rule}, {request.steps} steps; "
          f"baseline: {baseline}) of {what}: f(x) = {res.score:.4f}, "
          f"f(baseline) = {res.baseline_score:.4f}, attributions sum to "
          f"{res.score - res.baseline_score + res.gap:.4f}; completeness gap "
          f"(convergence delta) {res.gap:+.3g} "
          f"({100 * res.relative_gap:.3g}% of f(x) - f(baseline))")


def _write_json(path: Path, request: Request, res: ig_lib.Result,
                baseline: str, **fields) -> None:
  path.write_text(json.dumps({
      "method": "integrated_gradients", "rule": request.rule,
      "steps": request.steps, "baseline": baseline, "score": res.score,
      "baseline_score": res.baseline_score, "gap": res.gap,
      "relative_gap": res.relative_gap, **fields}, indent=1) + "\n")
