r"""Prepares a config's corpus offline (tfds array_record files), once.

python scripts/prepare_data.py --config=configs/lm.py:tiny
Training does this on its own when needed; this script only does it ahead.
"""
from absl import logging
from ml_collections import config_flags

from lm.run import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm.data import pipeline  # noqa: PLC0415
  b = pipeline.prepare(_CONFIG.value.data)
  for split in ("train", "validation", "test"):
    source = b.as_data_source(split=split)
    print(f"{b.builder_config.name} {split}: {len(source)} documents")
  print(f"prepared in {b.data_path}")


if __name__ == "__main__":
  cli.run(main)
