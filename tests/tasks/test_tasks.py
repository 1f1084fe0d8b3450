"""Classifier and GAN runs through the shared trainer: eval metrics equal
scikit-learn's on the same predictions, the GAN metrics behave, and a GAN
checkpoint resumes exactly."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from sklearn import metrics as skm

from configs import classify_text, gan_digits, mlp_digits
from lm import metrics
from lm.run import restore
from lm.data import images
from lm.tasks import feature_classifier
from lm.run import loop

MESH = dict(data=2, fsdp=2, tensor=2)


def _eval_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == "eval"]


@pytest.fixture(scope="module")
def digits_run(data_dir, tmp_path_factory):
  config = mlp_digits.get_config()
  config.mesh = MESH
  config.data.data_dir = data_dir
  config.model.width = 64
  config.train.update(steps=40, batch_size=32, log_every=20, eval_every=40,
                      checkpoint_every=0)
  config.optimizer.warmup_steps = 40  # The preset's 50 is longer.
  workdir = tmp_path_factory.mktemp("mlp_digits")
  loop.train(config, workdir)
  return config, workdir


def test_classifier_metrics_equal_sklearn_on_the_same_predictions(digits_run):
  config, workdir = digits_run
  [line] = _eval_lines(workdir)
  # Unsharded reference: the restored model on one device, plain numpy.
  loaded = restore.load(workdir, "1,1,1")
  model = nnx.merge(loaded.setup.graphdef, jax.device_get(loaded.params))
  images_u8, labels = images.load_split(config.data, "test")
  probs = np.asarray(jax.nn.softmax(model(images.normalize(images_u8,
                                                           "digits"))))
  preds = probs.argmax(-1)
  assert line["accuracy"] == pytest.approx(skm.accuracy_score(labels, preds),
                                           abs=1e-6)
  for key, fn in (("precision", skm.precision_score),
                  ("recall", skm.recall_score), ("f1", skm.f1_score)):
    assert line[key] == pytest.approx(
        fn(labels, preds, average="macro", zero_division=0), abs=1e-6), key
  assert line["roc_auc"] == pytest.approx(
      skm.roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-5)
  assert line["loss"] == pytest.approx(skm.log_loss(labels, probs), rel=1e-4)
  assert os.path.exists(os.path.join(workdir, "images",
                                     "confusion_000040.png"))


def test_text_classifier_reports_the_majority_baseline(data_dir, tmp_path):
  config = classify_text.get_config()
  config.mesh = MESH
  config.data.update(data_dir=data_dir, seq_len=32)
  config.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2,
                      d_ff=64, max_len=32)
  config.train.update(steps=4, batch_size=16, log_every=2, eval_every=4,
                      checkpoint_every=0)
  config.optimizer.warmup_steps = 0
  loop.train(config, tmp_path)
  [line] = _eval_lines(tmp_path)
  for key in ("accuracy", "precision", "recall", "f1", "roc_auc",
              "majority_accuracy", "majority_f1"):
    assert 0.0 <= line[key] <= 1.0, key
  # Always predicting one of four classes: macro F1 <= 1/4 of its own F1.
  assert line["majority_f1"] < 0.25


@pytest.fixture(scope="module")
def classifier(data_dir):
  config = gan_digits.get_config()
  config.data.data_dir = data_dir
  return feature_classifier.load_or_train(config.data), config


def _features(classifier, x):
  feats, probs = classifier.apply(classifier.params, x)
  return np.asarray(feats), np.asarray(probs)


def test_gan_metrics_on_real_and_noise_images(classifier):
  clf, config = classifier
  assert clf.test_accuracy > 0.95
  test = images.normalize(images.load_split(config.data, "test")[0], "digits")
  train = images.normalize(images.load_split(config.data, "train")[0],
                           "digits")
  test_feats, test_probs = _features(clf, test)
  train_feats, _ = _features(clf, train[:len(test)])
  noise = np.random.default_rng(0).uniform(-1, 1, test.shape)
  noise_feats, noise_probs = _features(clf, noise.astype(np.float32))
  assert metrics.frechet_distance(test_feats, test_feats) < 1e-6
  held_out = metrics.frechet_distance(train_feats, test_feats)
  assert held_out < 10.0
  assert metrics.frechet_distance(noise_feats, test_feats) > 10 * held_out
  assert metrics.classifier_score(test_probs) > 8.0
  assert metrics.classifier_score(noise_probs) < 5.0


def _gan_config(data_dir, steps):
  config = gan_digits.get_config()
  config.mesh = MESH
  config.data.data_dir = data_dir
  config.model.update(width=32, latent_dim=16)
  config.train.update(steps=steps, batch_size=16, log_every=1, eval_every=0,
                      checkpoint_every=0)
  return config


def test_gan_checkpoint_resumes_exactly(data_dir, tmp_path):
  whole = loop.train(_gan_config(data_dir, 6), tmp_path / "whole")
  loop.train(_gan_config(data_dir, 6), tmp_path / "split", stop_at_step=3)
  resumed = loop.train(_gan_config(data_dir, 6), tmp_path / "split")
  assert resumed["step"] == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(whole["params"]),
               jax.device_get(resumed["params"]))
  losses = lambda d: [(r["d_loss"], r["g_loss"]) for r in map(  # noqa: E731
      json.loads, open(d / "metrics.jsonl")) if r["split"] == "train"]
  assert losses(tmp_path / "whole") == losses(tmp_path / "split")


def test_gan_eval_writes_metrics_and_samples(data_dir, classifier, tmp_path):
  config = _gan_config(data_dir, 2)
  config.train.eval_every = 2
  loop.train(config, tmp_path)
  [line] = _eval_lines(tmp_path)
  # An untrained generator: far from the digits, low classifier score.
  assert line["cfid"] > 10.0
  assert 1.0 <= line["classifier_score"] <= 10.0
  assert os.path.exists(tmp_path / "images" / "samples_000002.png")
