"""Offline data: tfds builders, tokenizers and grain pipelines."""
from lm.data.pipeline import Data, make, prepare
from lm.data.sources import DataError
