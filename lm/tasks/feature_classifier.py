"""The fixed classifier behind the GAN metrics (cFID, classifier score).

An MLP trained once per dataset with a fixed recipe and seed on one device,
then stored (an .npz of its parameters) next to the prepared data, so every
GAN run and every eval compares against the same features. Its features are
the last hidden layer; its test accuracy is printed when it is trained.

It is process-local: each process of a multi-process job loads it onto one
of its own devices (an orbax checkpoint would make the processes
coordinate over a model only one of them may be saving).
"""
from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from lm import config as config_lib
from lm.data import images, pipeline
from lm.parallel import make_mesh
from lm.tasks import classify
from lm.train import state as state_lib, step as step_lib

VERSION = 2  # Bump when the recipe or format changes (2: .npz, was orbax).


def recipe(data_cfg) -> ml_collections.ConfigDict:
  """The training config of the feature classifier for data_cfg.dataset."""
  dataset = data_cfg.dataset
  c = config_lib.base("mlp")
  c.model.update(image_shape=images.IMAGE_SHAPES[dataset],
                 num_classes=images.NUM_CLASSES, depth=2, width=128,
                 activation="gelu", dropout=0.1, layer_norm=True)
  c.mesh.update(data=1)
  c.optimizer.update(name="adamw", learning_rate=1e-3, schedule="cosine",
                     warmup_steps=50, end_learning_rate_fraction=0.01, b1=0.9,
                     b2=0.999, eps=1e-8, weight_decay=1e-4, grad_clip_norm=1.0)
  c.train.update(steps=1500, batch_size=128)
  # Augmentation helps on 28x28 MNIST and hurts on 8x8 digits (measured
  # with configs/mlp_*.py).
  c.data.update(dataset=dataset, data_dir=data_cfg.data_dir,
                augment=dataset != "digits", max_shift=2, max_rotation=10.0)
  return c


@dataclasses.dataclass(frozen=True)
class FeatureClassifier:
  graphdef: nnx.GraphDef
  params: dict  # On the host; replicated onto a mesh by the caller's jit.
  test_accuracy: float

  def apply(self, params, images_BxHxWxC):
    """(features B x F, class probabilities B x C), float32."""
    model = nnx.merge(self.graphdef, params)
    feats = model.features(images_BxHxWxC)
    return feats.astype(np.float32), jax.nn.softmax(model.head(feats), -1)


def _directory(data_cfg) -> epath.Path:
  return (pipeline.data_dir(data_cfg) / "feature_classifiers" /
          f"{data_cfg.dataset}-v{VERSION}")


def load_or_train(data_cfg) -> FeatureClassifier:
  directory = _directory(data_cfg)
  config = recipe(data_cfg)
  mesh = make_mesh(config.mesh, jax.local_devices()[:1])
  with jax.set_mesh(mesh):
    setup = state_lib.make_setup(config, mesh)
    with pipeline.file_lock(directory.parent / f".{directory.name}.lock"):
      if not (directory / "info.json").exists():
        _train(config, setup, directory)
    params = _load(directory / "params.npz", setup.abstract_state.params)
    info = json.loads((directory / "info.json").read_text())
  return FeatureClassifier(setup.graphdef, params, info["test_accuracy"])


def _save(path, params) -> None:
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
  with path.open("wb") as f:
    np.savez(f, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


def _load(path, abstract_params):
  """The stored arrays, on the host, in `abstract_params`' structure."""
  with path.open("rb") as f:
    stored = dict(np.load(f))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  return jax.tree_util.tree_unflatten(
      treedef, [stored[jax.tree_util.keystr(k)] for k, _ in leaves])


def _train(config, setup, directory: epath.Path) -> None:
  task = classify.Classification(config)
  data = task.make_data()
  train_step = step_lib.jit_train_step(setup, task)
  eval_step = step_lib.jit_eval_step(setup, task)
  state = setup.init_fn(jax.random.key(config.seed))
  for _ in range(config.train.steps):
    state, _ = train_step(state, next(data.train))
  outputs = [jax.device_get(eval_step(state.params, b))
             for b in data.eval]
  accuracy = task.summarize(outputs, data)["accuracy"]
  print(f"feature classifier for {config.data.dataset}: test accuracy "
        f"{accuracy:.4f}; stored in {directory}", flush=True)
  tmp = directory.with_name(directory.name + ".tmp")
  tmp.mkdir(parents=True, exist_ok=True)
  _save(tmp / "params.npz", state.params)
  (tmp / "info.json").write_text(json.dumps(
      {"test_accuracy": accuracy, "recipe": config.to_dict()}, default=list))
  tmp.replace(directory)  # Atomic: a half-trained classifier is never read.
