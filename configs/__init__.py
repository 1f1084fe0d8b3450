"""Experiment configs: one `get_config(arg)` file per experiment, each
extending the base config (lm/config.py). Load one with
`--config=configs/NAME.py[:ARG]`."""
