"""The exceptions that mean "the user gave something wrong", ended by `main` in one line
(a bottom-layer module: convert, train and the entry points raise them).

Everything else that escapes the trainer is our bug and keeps its traceback. The data side
raises its own `DataError` (data/errors.py) for bad input files; `USER_ERRORS` lists both.
"""

from __future__ import annotations

from ma2mba_jax.data.errors import DataError


class UserError(Exception):
  """Bad input from the user; the message names the config field, file or value."""


class ConfigError(UserError, ValueError):
  """A config value out of range or inconsistent with another, or a missing input."""


class WorkdirConflictError(UserError):
  """The workdir holds a run made with other settings or inputs than this config's."""


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss (or the state) became NaN or inf; nothing from that step on was saved."""


USER_ERRORS = (UserError, DataError)
