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
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import paths
from lm.checks import UsageError
from lm.data import images as images_lib, tokenizer as tokenizer_lib
from lm.explain import attention_maps, forward, integrated_gradients as ig_lib
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
  # One text, its layers run one at a time: no context, pipeline or expert
  # parallelism (an MoE layer routes the text's tokens as one group, as
  # scripts/generate.py does; expert parallelism splits a batch's rows).
  if any(sizes.get(axis, 1) != 1 for axis in ("sequence", "stage",
                                              "expert")):
    if mesh:
      raise UsageError(f"--mesh={mesh}: explain.py runs the layers one at a "
                       "time on one text, without context, pipeline or "
                       "expert parallelism; drop the sequence, stage and "
                       "expert axes.")
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
  out = (paths.resolve(request.out) if request.out
         else paths.resolve(workdir) / "explain")
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
  config = loaded.config
  tok = tokenizer_lib.get(config.data.tokenizer)
  ids_L = checked.tokens
  labels = render.token_labels(tok, ids_L)
  lm = config.model.name == "transformer"
  position = request.position % len(ids_L)
  # One program for everything (a compile costs more than the work here).
  results = jax.device_get(jax.jit(functools.partial(
      _explain_text, loaded.setup.graphdef, methods=checked.methods, lm=lm,
      position=position, target_class=request.target_class,
      baseline_id=tok.eos_id, steps=request.steps, rule=request.rule,
      batch_size=request.batch_size))(loaded.params, ids_L[None]))
  lines = []
  if "attention" in checked.methods:
    probs = results["maps"]
    for layer, probs_1xHxLxL in enumerate(probs):
      render.attention_png(probs_1xHxLxL[0], labels, layer,
                           out / f"attention_layer_{layer}.png")
    with (out / "attention.npz").open("wb") as f:
      np.savez(f, tokens=ids_L,
               **{f"layer_{i}": p[0] for i, p in enumerate(probs)})
    lines.append(f"attention maps: {len(probs)} layers x "
                 f"{probs[0].shape[1]} heads over {len(ids_L)} tokens -> "
                 f"{out}/attention_layer_*.png, attention.npz")
  if "ig" not in checked.methods:
    return lines
  res = ig_lib.result(*results["ig"])
  log_probs, target = np.asarray(results["log_probs"]), int(results["target"])
  if lm:
    target_name = render.token_labels(tok, [target])[0]
    what = (f"log p({render.quoted(target_name)} | the tokens up to "
            f"position {position} {render.quoted(labels[position])})")
    picked = "" if position + 1 < len(ids_L) else " (the model's most likely)"
    target_json = {"position": position, "token": target,
                   "text": target_name}
  else:
    names = _class_names(config)
    target_name = names[target]
    what = f"the logit of class {target} ({target_name})"
    picked = (f" (predicted: {names[int(np.argmax(log_probs))]}, "
              f"p = {np.exp(log_probs.max()):.3f})")
    target_json = {"class": target, "name": target_name}
  per_token_L = res.attributions.sum(axis=-1)  # Over the embedding.
  header = [f"step {loaded.step}: integrated gradients of {what}{picked}",
            f"f(x) {res.score:.4f}, f(baseline) {res.baseline_score:.4f}, "
            f"completeness gap {res.gap:+.2e} ({request.steps} steps)"]
  render.text_png(labels, per_token_L, header, out / "attributions.png")
  render.text_html(labels, per_token_L, header, out / "attributions.html")
  _write_json(out / "attributions.json", request, res, TEXT_BASELINE,
              target=target_json, tokens=labels,
              token_ids=[int(i) for i in ids_L],
              attributions=[float(a) for a in per_token_L])
  return lines + [_summary(what + picked, res, request, TEXT_BASELINE),
                  f"token attributions -> {out}/attributions.png, "
                  "attributions.html, attributions.json"]


def _explain_text(graphdef, params, tokens_1xL, *, methods, lm: bool,
                  position: int, target_class: int, baseline_id: int,
                  steps: int, rule: str, batch_size: int) -> dict:
  """The text families' maps and integrated gradients (traced). The LM's
  target: the text's own next token, or after its end the model's most
  likely; a classifier's: target_class, or the predicted class."""
  model = nnx.merge(graphdef, params)
  out = {}
  if "attention" in methods:
    out["maps"] = attention_maps.maps(model, tokens_1xL)
  if "ig" not in methods:
    return out
  x_1xLxD = model.transformer.embed(tokens_1xL)
  h_1xLxD, _ = forward.run(model.transformer, x_1xLxD)
  L = tokens_1xL.shape[1]
  if lm:
    logits_C = model.logits(h_1xLxD[:, position:position + 1])[0, 0]
  else:
    logits_C = model.classify(h_1xLxD)[0]
  log_probs_C = jax.nn.log_softmax(logits_C)
  if lm:
    target = (tokens_1xL[0, position + 1] if position + 1 < L
              else jnp.argmax(log_probs_C))
    f = targets.lm_log_prob(model, position, target)
  else:
    target = target_class if target_class >= 0 else jnp.argmax(log_probs_C)
    f = targets.classifier_logit(model, target)
  baseline_LxD = model.transformer.embed(
      jnp.full_like(tokens_1xL, baseline_id))[0]
  out["ig"] = ig_lib.integrated_gradients(
      f, x_1xLxD[0], baseline_LxD, steps=steps, rule=rule,
      batch_size=batch_size)
  out["log_probs"], out["target"] = log_probs_C, target
  return out


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
  def attribute(params, image_HxWxC):
    model = nnx.merge(graphdef, params)
    predicted = jnp.argmax(model(image_HxWxC[None])[0])
    target = (request.target_class if request.target_class >= 0
              else predicted)
    return ig_lib.integrated_gradients(
        targets.image_logit(model, target), image_HxWxC,
        jnp.full_like(image_HxWxC, baseline), steps=request.steps,
        rule=request.rule, batch_size=request.batch_size), predicted, target

  results, titles, records = [], [], []
  for image, label in zip(images_NxHxWxC, labels_N):
    outputs, predicted, target = jax.device_get(attribute(loaded.params,
                                                          image))
    res = ig_lib.result(*outputs)
    predicted, target = int(predicted), int(target)
    results.append(res)
    titles.append((f"label {label}, predicted {predicted}",
                   f"IG, class {target} (gap {100 * res.relative_gap:.2g}%)"))
    records.append({"label": int(label), "predicted": predicted,
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
