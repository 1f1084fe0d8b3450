"""GAN training: one jitted step updates the discriminator, then the
generator against the updated discriminator (non-saturating loss, optional R1
penalty on real images).

Evaluation generates images from a fixed latent batch and compares them with
the real test images through a fixed classifier (lm/tasks/feature_classifier.py):
cFID (Fréchet distance of the classifier's features, float64 on the host) and
the classifier score (the Inception-score analogue; at most the number of
classes). A PNG grid of the first samples goes to WORKDIR/images/.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm import checks, metrics, paths
from lm.data import images
from lm.parallel import constrain
from lm.tasks import feature_classifier
from lm.train import precision, step as step_lib

EVAL_LATENT_SEED = 1234  # The same latents at every eval and in every run.
GRID = 100  # Samples in the PNG grid.


def _d_loss(model, real_BxHxWxC, fake_BxHxWxC, r1_gamma: float):
  """Non-saturating discriminator loss (+ R1: gamma/2 E|grad_x D(real)|^2)."""
  real_B = model.discriminate(real_BxHxWxC)
  fake_B = model.discriminate(fake_BxHxWxC)
  loss = jnp.mean(jax.nn.softplus(-real_B)) + jnp.mean(jax.nn.softplus(fake_B))
  aux = {"d_real": jnp.mean(jax.nn.sigmoid(real_B)),
         "d_fake": jnp.mean(jax.nn.sigmoid(fake_B))}
  if r1_gamma:
    g = jax.grad(lambda x: model.discriminate(x).sum())(real_BxHxWxC)
    r1 = jnp.mean(jnp.sum(jnp.square(g), axis=(1, 2, 3)))
    loss = loss + 0.5 * r1_gamma * r1
    aux["r1"] = r1
  return loss, aux


class Gan:
  name = "gan"
  MODELS = ("gan",)
  EVAL_METRICS = ("cfid", "classifier_score")

  def __init__(self, config):
    self.config = config
    self.r1_gamma = float(config.gan.r1_gamma)
    self.classifier = None  # Set by prepare_eval.

  def check(self, model_cfg, mesh: dict[str, int]) -> None:
    """The image data, and what the two-network step does not support."""
    del mesh
    config = self.config
    images.check(config, model_cfg)
    accum = config.train.grad_accum_steps
    checks.require(accum == 1, f"config.train.grad_accum_steps={accum}: the "
                   "GAN step updates two networks in turn on the whole batch;"
                   " set it to 1.")
    mode = config.train.grad_reduce
    checks.require(mode == "auto",
                   f"config.train.grad_reduce={mode!r}: the GAN step updates "
                   "two networks in turn; use 'auto'.")
    checks.require(
        config.quant.mode == "none",
        f"config.quant.mode={config.quant.mode!r}: quantization-aware "
        "training covers the LM and the classifiers, not config.task='gan';"
        " set config.quant.mode='none'.")
    checks.require(not config.prune.sparsity or not config.prune.layers,
                   "config.prune.layers: the GAN prunes each network's "
                   "matrices; leave it empty.")
    self.check_teacher(None, None, model_cfg,
                       "config.distill.teacher_workdir="
                       f"{config.distill.teacher_workdir!r}")

  def check_teacher(self, teacher_config, teacher_cfg, model_cfg,
                    where: str) -> None:
    del teacher_config, teacher_cfg, model_cfg
    checks.require(not self.config.distill.teacher_workdir,
                   f"{where}: distillation covers the LM and the classifiers,"
                   " not config.task='gan'.")

  def model_flops_per_step(self, model_cfg) -> None:
    return None  # XLA's cost analysis counts them (lm/run/perf.py).

  def privacy_examples(self) -> int:
    """The GAN does not train privately (lm/run/checks.py says why before
    this could be asked)."""
    raise checks.ConfigError(
        "config.privacy (DP-SGD) with config.task='gan' is not supported: "
        "per-example clipping does not apply to the GAN's steps.")

  def prepare_eval(self):
    """The fixed feature classifier behind cFID: loaded from next to the
    prepared data, or trained once and stored there. Returns its params."""
    self.classifier = feature_classifier.load_or_train(self.config.data)
    return self.classifier.params

  def make_data(self, share_index: int = 0, share_count: int = 1):
    data = images.make(self.config, share_index, share_count)
    latent = self.config.model.latent_dim
    rng = np.random.default_rng(EVAL_LATENT_SEED + share_index)
    for batch in data.eval:
      batch["z"] = rng.standard_normal(
          (len(batch["label"]), latent)).astype(np.float32)
    return data

  def batch_spec(self) -> dict:
    """The global train batch's shapes (tools that compile without data)."""
    b = self.config.train.batch_size
    return {"image": jax.ShapeDtypeStruct((b, *self.config.model.image_shape),
                                          jnp.float32),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32)}

  def throughput(self) -> tuple[str, int]:
    return "examples", self.config.train.batch_size

  def train_step(self, state, batch, *, setup, accum_steps: int = 1,
                 teacher=None):
    del accum_steps, teacher  # Checked: 1 and None (see `check`).
    key_d, key_g = jax.random.split(step_lib.step_key(setup.seed, state.step))
    real = batch["image"]
    shape = (real.shape[0], setup.model_cfg.latent_dim)
    z_d = constrain(jax.random.normal(key_d, shape), "batch", None)
    z_g = constrain(jax.random.normal(key_g, shape), "batch", None)
    g_params = state.params["generator"]
    d_params = state.params["discriminator"]

    def model(g, d):
      return nnx.merge(setup.graphdef, {"generator": g, "discriminator": d})

    # float16: both losses are scaled by the same loss scale, and a step
    # with any non-finite gradient leaves both networks unchanged.
    scale = state.loss_scale
    fake = jax.lax.stop_gradient(model(g_params, d_params).generate(z_d))
    (d_loss, aux), d_grads = precision.value_and_grad(
        lambda d: _d_loss(model(g_params, d), real, fake, self.r1_gamma),
        scale, has_aux=True)(d_params)
    new_d, d_opt = step_lib.apply_gradients(
        setup.tx["discriminator"], d_grads, state.opt_state["discriminator"],
        d_params)

    def g_loss_fn(g):
      m = model(g, new_d)
      return jnp.mean(jax.nn.softplus(-m.discriminate(m.generate(z_g))))

    g_loss, g_grads = precision.value_and_grad(g_loss_fn, scale)(g_params)
    new_g, g_opt = step_lib.apply_gradients(
        setup.tx["generator"], g_grads, state.opt_state["generator"], g_params)
    params = {"generator": new_g, "discriminator": new_d}
    opt_state = {"generator": g_opt, "discriminator": d_opt}
    if scale is not None:
      finite = precision.all_finite((d_grads, g_grads))
      params, opt_state = precision.select(
          finite, (params, opt_state), (state.params, state.opt_state))
      scale = scale.adjust(finite)
    metrics_ = {"loss": d_loss + g_loss, "d_loss": d_loss, "g_loss": g_loss,
                "d_grad_norm": optax.tree.norm(d_grads),
                "g_grad_norm": optax.tree.norm(g_grads),
                "learning_rate": setup.schedule(state.step), **aux,
                **precision.metrics(scale)}
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, loss_scale=scale)
    return new_state, metrics_

  def eval_step(self, model, batch: dict, eval_inputs) -> dict:
    """Generated and real images through the feature classifier, whose
    parameters `prepare_eval` returned."""
    classifier_params = eval_inputs
    fake = model.generate(batch["z"])
    real_feats, real_probs = self.classifier.apply(classifier_params,
                                                   batch["image"])
    fake_feats, fake_probs = self.classifier.apply(classifier_params, fake)
    return {"fake": fake, "fake_feats": fake_feats, "fake_probs": fake_probs,
            "real_feats": real_feats, "mask": batch["mask"]}

  def summarize(self, outputs: list[dict], data, *, workdir: Path | None = None,
                step: int = 0) -> dict[str, float]:
    mask = np.concatenate([o["mask"] for o in outputs]) > 0
    get = lambda k: np.concatenate([o[k] for o in outputs])[mask]  # noqa: E731
    result = {"cfid": metrics.frechet_distance(get("fake_feats"),
                                               get("real_feats")),
              "classifier_score": metrics.classifier_score(get("fake_probs"))}
    if workdir is not None and jax.process_index() == 0:
      path = paths.resolve(workdir) / "images" / f"samples_{step:06d}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      metrics.save_image_grid_png(get("fake")[:GRID], path)
    return result
