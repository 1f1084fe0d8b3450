"""The compression switches every trainable config carries (lm, classifiers):
quantization-aware training, distillation and magnitude pruning. All off by
default; a config names only which of its layers are quantized or pruned.

Used as `c.update(compression.defaults(layers=...))`; override any field on
the command line, e.g. --config.quant.mode=int8 --config.prune.sparsity=0.5.
"""


def defaults(layers: tuple[str, ...]) -> dict:
  """`layers`: regexes fully matching the module paths to quantize and prune
  (the embedding and output head are left out by convention)."""
  return dict(
      quant=dict(
          mode="none",  # none | int8 | int4_weights | fp8 | int4 (TPU/GPU).
          layers=layers,  # Module paths, e.g. "transformer/blocks/0/mlp/up".
          activations="int8",  # int4_weights only: int8 | float.
          backward="none"),  # none | int8 | fp8: quantized gradients too.
      distill=dict(
          teacher_workdir="",  # A finished run of the same task; "" = off.
          temperature=2.0,  # Softens both distributions.
          alpha=0.5),  # loss = alpha * hard-label CE + (1 - alpha) * T^2 KL.
      prune=dict(
          sparsity=0.0,  # Final fraction of zeros per pruned layer; 0 = off.
          begin_step=0,
          end_step=0,  # 0 = 75% of config.train.steps (then fine-tune).
          update_every=10,  # Steps between mask updates.
          # Parameter paths (module path + "/kernel"); () = every matrix.
          layers=tuple(f"{p}/kernel" for p in layers)))
