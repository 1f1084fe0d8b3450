"""Training: state, pure steps, optimizers, checkpoints and the loop."""
from lm.train.loop import run
