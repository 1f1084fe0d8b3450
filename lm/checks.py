"""The error every config check raises, and the helpers the checks share.

Each config section is checked by its owner (the mesh by lm/parallel, a
model's shapes by its module, the data by lm/data, ...); checks that span
sections live in lm/run/checks.py. Every message names the config key and
the fix, and every check runs before any data is read or anything compiles.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
  """Something the user fixes (a config value, a flag, a file, the run
  directory): the message names it and the fix. Scripts print it as one
  line, without a traceback (lm/run/cli.py)."""


class ConfigError(UserError, ValueError):
  """A bad config value; the message names the key and how to fix it."""


class UsageError(UserError, ValueError):
  """A bad command-line flag of a script; the message names the flag."""


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def one_of(value, allowed, key: str) -> None:
  require(value in allowed, f"{key}={value!r} is unknown; use one of "
          f"{sorted(allowed)}.")


def nearest(name: str, choices: Iterable[str]) -> str | None:
  """The closest of `choices` to a misspelled `name`, if any is close."""
  close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
  return close[0] if close else None
