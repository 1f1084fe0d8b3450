"""A run as a TensorFlow SavedModel, the format TF Serving loads: the
functions lm/interop/export.py describes, converted by jax2tf (each one a
StableHLO program inside an XlaCallModule op), the weights as tf.Variables.

  saved_model.pb, variables/   the SavedModel; signatures: a language
                               model's `prefill` and `decode`, a
                               classifier's `logits`; `serving_default` is
                               the first of them (prefill, logits)
  export.json                  as the StableHLO export's

TensorFlow is needed only here (and by the tests): TENSORFLOW is the pin
the message for a missing TensorFlow names, kept equal to
requirements-test.txt's by tests/interop/test_export.py.
"""
from __future__ import annotations

from pathlib import Path

import jax

from lm.checks import UsageError
from lm.interop import export

TENSORFLOW = "tensorflow-cpu==2.21.0"


def export_savedmodel(workdir, out, *, overwrite: bool = False) -> dict:
  """Writes `workdir`'s latest parameters and its functions into `out` as a
  SavedModel; returns export.json's contents."""
  tf, jax2tf = _tensorflow()
  out = Path(out).expanduser()
  prepared = export.prepare(workdir, out, overwrite=overwrite,
                            fmt="savedmodel")
  module = tf.Module()
  # Variables, not captured constants: the weights land in variables/
  # (checkpoint shards) and the graph stays the size of the program.
  module.weights = [tf.Variable(w, trainable=False, name=f"w{i:04d}")
                    for i, w in enumerate(prepared.weights)]
  signatures = {}
  # jax2tf exports when a function is traced: inside the run's mesh, as
  # export_stablehlo does.
  with jax.set_mesh(prepared.mesh):
    for name, f in prepared.functions.items():
      fn = _tf_function(tf, jax2tf, list(module.weights), f)
      setattr(module, name, fn)  # Also callable as loaded.<name>(...).
      signatures[name] = fn.get_concrete_function()
  signatures["serving_default"] = signatures[next(iter(prepared.functions))]
  tf.saved_model.save(module, str(out), signatures=signatures)
  export.write_about(out, prepared.about)
  return prepared.about


def _tensorflow():
  try:
    import tensorflow as tf  # noqa: PLC0415 - an optional dependency.
    from jax.experimental import jax2tf  # noqa: PLC0415 - imports tf.
  except ModuleNotFoundError as e:
    if not (e.name or "").startswith("tensorflow"):
      raise  # Installed, but broken: the traceback says how.
    raise UsageError(f"--format=savedmodel needs TensorFlow, which is not "
                     f"installed: pip install {TENSORFLOW}") from e
  return tf, jax2tf


def _tf_function(tf, jax2tf, weights: list, f: export.Function):
  """`f` as a tf.function of its inputs (named tensors, None for symbolic
  dimensions) returning a dict of its named outputs; `weights` are read
  from the variables at each call."""
  converted = jax2tf.convert(
      f.fn, polymorphic_shapes=[None, *(shape or None
                                        for _, _, shape in f.inputs)],
      polymorphic_constraints=f.constraints,
      # Serving only: no VJP program to export and store.
      with_gradient=False)
  specs = [tf.TensorSpec([int(d) if d.strip().isdigit() else None
                          for d in shape.split(",")] if shape else [],
                         tf.as_dtype(dtype), name=name)
           for name, dtype, shape in f.inputs]

  def call(*inputs):
    results = converted(weights, *inputs)
    return dict(zip(f.outputs, results if len(f.outputs) > 1
                    else (results,)))

  return tf.function(call, input_signature=specs, autograph=False)
