r"""GAN on scikit-learn's 8x8 digits: an MLP generator and discriminator.

python scripts/train.py --config=configs/gan_digits.py --workdir=runs/gan_digits

Eval lines hold cfid (Fréchet distance of a fixed classifier's features,
generated vs real test digits) and classifier_score (max 10); a grid of
samples from a fixed latent batch goes to WORKDIR/images/samples_*.png.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "gan"
  c.model = dict(
      name="gan",
      image_shape=(8, 8, 1),  # Must match the dataset's images.
      arch="mlp",  # mlp (small images) | dcgan (28x28).
      latent_dim=64,
      width=256,  # mlp: hidden units; dcgan: channels of the first conv.
      depth=2)  # mlp only: hidden layers of each network.
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.precision = dict(compute_dtype="float32", param_dtype="float32")
  # One recipe for both networks, each with its own optimizer state.
  c.optimizer = dict(
      name="adamw", learning_rate=2e-4, schedule="constant", warmup_steps=0,
      end_learning_rate_fraction=1.0, b1=0.5, b2=0.999, weight_decay=0.0,
      grad_clip_norm=0.0)  # 0: no clipping.
  c.gan = dict(r1_gamma=1.0)  # R1 penalty on real images; 0 turns it off.
  c.train = dict(
      steps=6000,
      batch_size=64,
      grad_accum_steps=1,  # Must be 1 for the GAN.
      log_every=200,
      eval_every=2000,
      eval_batches=1,  # Unused: the eval covers the whole test split.
      checkpoint_every=2000,
      max_checkpoints=2)
  c.data = dict(dataset="digits", data_dir="", augment=False)
  return c
