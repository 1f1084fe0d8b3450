r"""GAN on scikit-learn's 8x8 digits: an MLP generator and discriminator.

python scripts/train.py --config=configs/gan_digits.py --workdir=runs/gan_digits

Eval lines hold cfid (Fréchet distance of a fixed classifier's features,
generated vs real test digits) and classifier_score (max 10); a grid of
samples from a fixed latent batch goes to WORKDIR/images/samples_*.png.
Every key and its default: lm/config.py (the model's: lm/models/gan.py).
"""
import ml_collections

from lm import config as base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config.base("gan")
  c.model.update(image_shape=(8, 8, 1), arch="mlp", latent_dim=64,
                 width=256, depth=2)
  # One recipe for both networks, each with its own optimizer state.
  c.optimizer.update(
      name="adamw", learning_rate=2e-4, schedule="constant", warmup_steps=0,
      end_learning_rate_fraction=1.0, b1=0.5, b2=0.999, weight_decay=0.0,
      grad_clip_norm=0.0)
  c.gan.r1_gamma = 1.0  # R1 penalty on real images.
  # The eval covers the whole test split (eval_batches unused).
  c.train.update(steps=6000, batch_size=64, log_every=200, eval_every=2000,
                 eval_batches=1, checkpoint_every=2000, max_checkpoints=2)
  c.data.update(dataset="digits", augment=False)
  return c
