"""The training engine: state, pure steps, optimizers, precision, pruning,
distillation losses and checkpoints. It knows no task, model name or script:
tasks and the run layer hand it what it needs."""
