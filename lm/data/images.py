"""Image classification data: prepared tfds splits -> grain batches.

Train: the split held in memory (a few MB) -> this process's share -> shuffle
(a new order every epoch, fixed by the seed) -> repeat -> pixels to [-1, 1]
-> optional augmentation (random integer shift and small rotation, seeded per
example so it is reproducible and resumable) -> batches. The iterator is a
grain `DatasetIterator`, checkpointed with the model.

Eval: the whole test split once, in stored order, padded to whole batches
with masked-out rows so every test example counts exactly once.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from lm import checks
from lm.data import image_builders, pipeline
from lm.data.sources import DataError

_CONFIGS = {c.name: c for c in image_builders.ImageDigits.BUILDER_CONFIGS}
DATASETS = tuple(_CONFIGS)  # ("digits", "mnist")
IMAGE_SHAPES = {name: c.shape for name, c in _CONFIGS.items()}
MAX_VALUES = {name: c.max_value for name, c in _CONFIGS.items()}  # 16, 255
NUM_CLASSES = image_builders.NUM_CLASSES
BACKGROUND = -1.0  # Black: no ink, after normalization.


def check(config, model_cfg) -> None:
  """config.data of an image run against the model's input shape."""
  dataset = _dataset(config.data)
  expected = tuple(IMAGE_SHAPES[dataset])
  checks.require(
      tuple(model_cfg.image_shape) == expected,
      f"config.model.image_shape={tuple(model_cfg.image_shape)} does not fit "
      f"config.data.dataset={dataset!r}, whose images are {expected}; set "
      f"config.model.image_shape={expected}.")
  for key in ("max_shift", "max_rotation"):
    checks.require(config.data[key] >= 0, f"config.data.{key} must be >= 0.")


def _dataset(data_cfg) -> str:
  dataset = data_cfg.dataset
  if dataset not in DATASETS:
    raise DataError(f"config.data.dataset={dataset!r} is unknown; use one of "
                    f"{DATASETS}.")
  return dataset


def builder(data_cfg) -> image_builders.ImageDigits:
  return image_builders.ImageDigits(
      config=_dataset(data_cfg), data_dir=str(pipeline.data_dir(data_cfg)),
      file_format="array_record")


def prepare(data_cfg) -> image_builders.ImageDigits:
  """Prepares the dataset once (idempotent, safe to call concurrently)."""
  # For mnist, finding the file first turns a missing one into a DataError
  # that names the fix.
  fill = image_builders.mnist_file if _dataset(data_cfg) == "mnist" else None
  return pipeline.prepare_once(builder(data_cfg), pipeline.data_dir(data_cfg),
                               fill)


def load_split(data_cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
  """uint8 N x H x W x 1 images and int32 N labels, in stored order."""
  b = prepare(data_cfg)
  source = b.as_data_source(split=split)
  examples = source.__getitems__(list(range(len(source))))
  if not examples:
    raise DataError(f"The {split!r} split of config.data.dataset="
                    f"{data_cfg.dataset!r} in {b.data_dir} is empty; delete "
                    "that directory so it is prepared again.")
  return (np.stack([ex["image"] for ex in examples]).astype(np.uint8),
          np.array([ex["label"] for ex in examples], np.int32))


def normalize(images_uint8: np.ndarray, dataset: str) -> np.ndarray:
  """Pixels 0..max (16 for digits, 255 for mnist) to float32 in [-1, 1]."""
  scale = np.float32(2.0 / MAX_VALUES[dataset])
  return images_uint8.astype(np.float32) * scale - np.float32(1.0)


def augment(image_HxWx1: np.ndarray, rng: np.random.Generator, *,
            max_shift: int, max_rotation: float) -> np.ndarray:
  """A random rotation within +-max_rotation degrees, then a random integer
  shift of up to max_shift pixels in x and y; uncovered pixels are black."""
  from scipy import ndimage  # noqa: PLC0415 - 0.3 s: not at every import.
  out = image_HxWx1
  if max_rotation:
    angle = rng.uniform(-max_rotation, max_rotation)
    out = ndimage.rotate(out, angle, axes=(0, 1), reshape=False, order=1,
                         mode="constant", cval=BACKGROUND)
  if max_shift:
    dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
    out = ndimage.shift(out, (dy, dx, 0), order=0, mode="constant",
                        cval=BACKGROUND)
  # Linear interpolation stays within [-1, 1] up to float rounding.
  return np.clip(out, -1.0, 1.0).astype(np.float32)


class Examples(grain.sources.RandomAccessDataSource):
  """In-memory (image, label) rows as {"image": float32, "label": int32}."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    return {"image": self.images[i], "label": self.labels[i]}


def train_iterator(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                   seed: int, augment_kw: dict | None = None,
                   share_index: int = 0, share_count: int = 1):
  """Endless shuffled batches of `batch_size` from float32 [-1, 1] images;
  `augment_kw` (max_shift, max_rotation) turns augmentation on."""
  ds = grain.MapDataset.source(
      Examples(images, labels))[share_index::share_count]
  if len(ds) < batch_size:
    raise DataError(
        f"The train split has {len(ds)} examples for this process, fewer than"
        f" one batch of {batch_size}: lower config.train.batch_size.")
  ds = ds.shuffle(seed=seed).repeat()
  if augment_kw:
    ds = ds.random_map(
        lambda ex, rng: dict(ex, image=augment(ex["image"], rng, **augment_kw)),
        seed=seed)
  ds = ds.batch(batch_size, drop_remainder=True)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                   prefetch_buffer_size=2)))


def eval_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 share_index: int = 0, share_count: int = 1) -> list[dict]:
  """This process's share of the split once, padded with masked black rows."""
  return pipeline.masked_batches(
      {"image": images[share_index::share_count],
       "label": labels[share_index::share_count].astype(np.int32)},
      batch_size=batch_size, global_rows=len(labels),
      share_count=share_count, pad_values={"image": BACKGROUND})


def train_source(config):
  """(the whole train split as random access to {"image", "label"}, the
  per-example augmentation or None): what Poisson sampling draws from."""
  dataset = _dataset(config.data)
  images, labels = load_split(config.data, "train")
  transform = None
  if config.data.augment:
    kw = dict(max_shift=int(config.data.max_shift),
              max_rotation=float(config.data.max_rotation))
    transform = lambda ex, rng: dict(  # noqa: E731
        ex, image=augment(ex["image"], rng, **kw))
  return Examples(normalize(images, dataset), labels), transform


@dataclasses.dataclass
class ImageData:
  train: object  # grain DatasetIterator: {"image": b x H x W x 1, "label": b}.
  eval: list[dict]  # The whole test split once: {"image", "label", "mask"}.
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int  # Examples in the whole split (all processes together).
  num_eval: int  # Examples in the whole test split: the sum of all masks.
  class_names: tuple[str, ...] = tuple(str(c) for c in range(NUM_CLASSES))
  # Balanced digit classes: no majority baseline (TextClassData has one).
  train_class_counts: np.ndarray | None = None


def make(config, share_index: int = 0, share_count: int = 1) -> ImageData:
  """Prepares (if needed) and opens the dataset named by config.data."""
  dataset = _dataset(config.data)
  batch_size = config.train.batch_size // share_count
  if batch_size < 1:
    raise DataError(f"config.train.batch_size={config.train.batch_size} is "
                    f"less than one example for each of {share_count} "
                    "processes; raise it.")
  train_images, train_labels = load_split(config.data, "train")
  test_images, test_labels = load_split(config.data, "test")
  augment_kw = None
  if config.data.augment:
    augment_kw = dict(max_shift=int(config.data.max_shift),
                      max_rotation=float(config.data.max_rotation))
  return ImageData(
      train=train_iterator(normalize(train_images, dataset), train_labels,
                           batch_size=batch_size, seed=config.seed,
                           augment_kw=augment_kw, share_index=share_index,
                           share_count=share_count),
      eval=eval_batches(normalize(test_images, dataset), test_labels,
                        batch_size=batch_size, share_index=share_index,
                        share_count=share_count),
      num_classes=NUM_CLASSES,
      image_shape=IMAGE_SHAPES[dataset],
      num_train=len(train_labels),
      num_eval=len(test_labels))
