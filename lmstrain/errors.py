"""Exceptions the library raises for problems a user can fix or should know about.

The CLI turns :class:`UserError` into exit status 2 and :class:`RunError` into exit
status 1, printing the message without a traceback.
"""


class LmstrainError(Exception):
    """Base class for every error lmstrain raises on purpose."""

    exit_code = 1


class UserError(LmstrainError):
    """The input is wrong (config, flags, data location): the user must change it."""

    exit_code = 2


class ConfigError(UserError):
    """The experiment config is invalid; the message names the key and the fix."""


class DataError(UserError):
    """The data cannot be found or read; the message names the case or file."""


class RunError(LmstrainError):
    """A run failed while working (e.g. the loss became NaN)."""
