"""Errors a user can act on.

Every error the launcher turns into an exit code derives from :class:`InstructrlError`.
Bad input (a recipe, an override, a data row, a plugin) is a :class:`UserInputError` and exits
with code 2 and one line; a failure while running is a :class:`RunFailure` and exits with code 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InstructrlError(Exception):
    """Base class of every error the launcher reports as one line."""

    exit_code = 1


class UserInputError(InstructrlError):
    """Bad input: recipe, override, data file, model path or plugin. Exit code 2."""

    exit_code = 2


class ConfigError(UserInputError):
    """A recipe key is unknown, mistyped, out of range or conflicts with another key."""


class DataError(UserInputError):
    """A dataset file or row cannot be read; the message names the file and line."""


class PluginError(UserInputError):
    """A plugin failed to import, or two plugins registered the same component name."""


class RunFailure(InstructrlError):
    """A stage failed while running; the message names the stage. Exit code 1."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def one_of(choices: Iterable[str]) -> str:
    """Format valid choices for an error message: ``"a, b or c"``."""
    items = sorted(set(choices))
    if not items:
        return "(none registered)"
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " or " + items[-1]
