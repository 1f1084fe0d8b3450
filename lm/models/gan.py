"""GAN: a generator and a discriminator in one module (two parameter groups,
each with its own optimizer state; see `OPTIMIZER_GROUPS`).

Two architectures, chosen by `Config.arch`:
- "mlp": both networks are MLPs; for small images such as 8x8 digits.
- "dcgan": DCGAN-style pair: the generator projects the latent to an
  (H/4) x (W/4) map and upsamples twice with stride-2 transposed convolutions;
  the discriminator mirrors it with stride-2 convolutions. For 28x28 MNIST.
There is no batch norm: its running statistics would be mutable state outside
the pure (params, opt_state) train state. The generator uses layer norm.

Images are in [-1, 1] (tanh output). Shapes: B batch, Z latent, H x W x C
image, F hidden width.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lm import checks
from lm.models import layers
from lm.parallel import constrain

# Trained by separate optimizers (the trainer keeps one state per group).
OPTIMIZER_GROUPS = ("generator", "discriminator")
ARCHS = ("mlp", "dcgan")


@dataclasses.dataclass(frozen=True)
class Config:
  image_shape: tuple[int, int, int] = (8, 8, 1)
  arch: str = "mlp"  # mlp | dcgan.
  latent_dim: int = 64
  width: int = 256  # mlp: hidden units; dcgan: channels of the first conv.
  depth: int = 2  # mlp only: hidden layers per network.
  dtype: str = "float32"
  param_dtype: str = "float32"


def check(cfg: Config, mesh: dict[str, int]) -> None:
  checks.one_of(cfg.arch, ARCHS, "config.model.arch")
  h, w, _ = cfg.image_shape
  checks.require(cfg.arch != "dcgan" or (h % 4 == 0 and w % 4 == 0),
                 f"config.model.image_shape={cfg.image_shape}: the dcgan "
                 "architecture upsamples twice by 2, so height and width must"
                 " be multiples of 4; use arch='mlp' for other shapes.")
  layers.no_transformer_axes(mesh)


def _conv_init():
  return layers.param_init(nnx.initializers.lecun_normal(), "kernel_space",
                           "kernel_space", "embed", "mlp")


def _bias_init():
  return layers.param_init(nnx.initializers.zeros, "mlp")


class MlpGenerator(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    dense = functools.partial(layers.Dense, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
    widths = [cfg.latent_dim] + [cfg.width] * cfg.depth
    self.hidden = nnx.List([dense(widths[i], widths[i + 1], ("embed", "mlp"))
                            for i in range(cfg.depth)])
    self.norms = nnx.List([
        layers.LayerNorm(cfg.width, dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, rngs=rngs)
        for _ in range(cfg.depth)])
    self.out = dense(widths[-1], _pixels(cfg), ("mlp", "embed"))

  def __call__(self, z_BxZ: jax.Array) -> jax.Array:
    x = z_BxZ
    for dense, norm in zip(self.hidden, self.norms):
      x = jax.nn.relu(norm(dense(x)))
    x = jnp.tanh(self.out(x).astype(jnp.float32))
    return x.reshape(z_BxZ.shape[0], *self.cfg.image_shape)


class MlpDiscriminator(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    dense = functools.partial(layers.Dense, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
    widths = [_pixels(cfg)] + [cfg.width] * cfg.depth
    self.hidden = nnx.List([dense(widths[i], widths[i + 1], ("embed", "mlp"))
                            for i in range(cfg.depth)])
    self.out = dense(widths[-1], 1, ("mlp", "classes"))

  def __call__(self, images_BxHxWxC: jax.Array) -> jax.Array:
    x = images_BxHxWxC.reshape(images_BxHxWxC.shape[0], -1)
    for dense in self.hidden:
      x = layers.ACTIVATIONS["leaky_relu"](dense(x))
    return self.out(x)[:, 0].astype(jnp.float32)


class ConvGenerator(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    h, w, c = cfg.image_shape
    self.base = (h // 4, w // 4, 2 * cfg.width)
    self.project = layers.Dense(
        cfg.latent_dim, self.base[0] * self.base[1] * self.base[2],
        ("embed", "mlp"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        rngs=rngs)
    up = functools.partial(nnx.ConvTranspose, kernel_size=(4, 4),
                           strides=(2, 2), padding="SAME", dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype,
                           kernel_init=_conv_init(), bias_init=_bias_init(),
                           rngs=rngs)
    norm = functools.partial(layers.LayerNorm, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm0 = norm(2 * cfg.width)
    self.up1 = up(2 * cfg.width, cfg.width)
    self.norm1 = norm(cfg.width)
    self.up2 = up(cfg.width, c)

  def __call__(self, z_BxZ: jax.Array) -> jax.Array:
    x = self.project(z_BxZ).reshape(z_BxZ.shape[0], *self.base)
    x = jax.nn.relu(self.norm0(x))
    x = jax.nn.relu(self.norm1(self.up1(x)))
    return jnp.tanh(self.up2(x).astype(jnp.float32))


class ConvDiscriminator(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    h, w, c = cfg.image_shape
    down = functools.partial(nnx.Conv, kernel_size=(4, 4), strides=(2, 2),
                             padding="SAME", dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype,
                             kernel_init=_conv_init(), bias_init=_bias_init(),
                             rngs=rngs)
    self.down1 = down(c, cfg.width)
    self.down2 = down(cfg.width, 2 * cfg.width)
    self.out = layers.Dense((h // 4) * (w // 4) * 2 * cfg.width, 1,
                            ("embed", "classes"), dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, images_BxHxWxC: jax.Array) -> jax.Array:
    leaky = layers.ACTIVATIONS["leaky_relu"]
    x = leaky(self.down1(images_BxHxWxC))
    x = leaky(self.down2(x))
    x = x.reshape(x.shape[0], -1)
    return self.out(x)[:, 0].astype(jnp.float32)


class Model(nnx.Module):
  """`generator(z_BxZ) -> images`, `discriminator(images) -> logits_B`."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    if cfg.arch == "mlp":
      self.generator = MlpGenerator(cfg, rngs)
      self.discriminator = MlpDiscriminator(cfg, rngs)
    else:
      self.generator = ConvGenerator(cfg, rngs)
      self.discriminator = ConvDiscriminator(cfg, rngs)

  def generate(self, z_BxZ: jax.Array) -> jax.Array:
    return constrain(self.generator(constrain(z_BxZ, "batch", None)),
                     "batch", None, None, None)

  def discriminate(self, images_BxHxWxC: jax.Array) -> jax.Array:
    return constrain(self.discriminator(images_BxHxWxC), "batch")


def _pixels(cfg: Config) -> int:
  h, w, c = cfg.image_shape
  return h * w * c


def make(cfg: Config, rngs: nnx.Rngs) -> Model:
  return Model(cfg, rngs)
