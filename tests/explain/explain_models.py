"""Random models for the tests of lm/explain, without an init compile."""
import jax
import numpy as np
from flax import nnx


def random_params(abstract_params, seed: int = 0):
  """Normal values for every parameter of an abstract (eval_shape) model,
  drawn on the host: jitted or eager, jax's initializers cost seconds of
  XLA compile per model. Weights scaled by their first axis (the input
  for every kernel here), norm scales near 1, biases non-zero (zero at
  init, so a bias left out of a computation shows)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    x = rng.standard_normal(leaf.shape)
    if "scale" in name:
      x = 1 + 0.1 * x
    elif "bias" in name:
      x = 0.3 * x
    else:
      x = x / np.sqrt(leaf.shape[0 if "embedding" not in name else 1])
    return x.astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract_params)


def random_model(cls, cfg, seed: int = 0):
  """A model of class `cls` with random_params."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(cfg,
                                                            nnx.Rngs(0))))
  return nnx.merge(graphdef, random_params(abstract, seed))
