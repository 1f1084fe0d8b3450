r"""The config of an existing run (its config.json): to fine-tune from it or
to continue it with changes.

python scripts/train.py --config=configs/run.py:runs/smol \
    --workdir=runs/smol_ft --config.train.init_from=runs/smol \
    --config.train.steps=200 --config.data.corpus=text_dir \
    --config.data.text_dir=my_texts

Every key of that run is the default; --config.x=y overrides any of them.
"""
import ml_collections

from lm.run import restore


def get_config(workdir: str) -> ml_collections.ConfigDict:
  return restore.load_config(workdir)
