"""The run: one training run and its directory (loop, checks that span config
sections, restore, metrics log, perf accounting). The top layer of `lm`."""
