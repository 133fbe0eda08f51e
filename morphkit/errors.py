"""Errors raised by morphkit.

Every error a user can trigger is a :class:`MorphkitError`. Each subclass also
inherits the matching builtin, so ``except ValueError`` keeps working for code
that does not know morphkit. Messages say what was received, what was expected
and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "MAX_MESSAGE_CHARS",
    "MorphkitError",
    "ConfigError",
    "UnsupportedModelError",
    "CheckpointError",
    "DataError",
    "TrainingError",
    "MissingDependencyError",
]


#: Longest message an error carries (characters); the rest is cut with a note. Messages quote input
#: (file metadata, arguments), which must not turn into megabytes of terminal output.
MAX_MESSAGE_CHARS = 2000


class MorphkitError(Exception):
    """Base class of every error morphkit raises on bad input or state.

    A message longer than ``MAX_MESSAGE_CHARS`` is cut, saying how much was cut.
    """

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str) and len(args[0]) > MAX_MESSAGE_CHARS:
            text = args[0]
            keep = MAX_MESSAGE_CHARS - 40
            args = (text[:keep] + f" ... ({len(text) - keep} more characters)", *args[1:])
        super().__init__(*args)


class ConfigError(MorphkitError, ValueError):
    """A bad argument or configuration value (width, solver input, config key)."""


class UnsupportedModelError(MorphkitError, TypeError):
    """A model morphkit cannot analyse or rebuild (unknown name, failing forward)."""


class CheckpointError(MorphkitError, OSError):
    """A model or manifold file that is missing, corrupt, or for another model."""


class DataError(MorphkitError, OSError):
    """A data path that is missing or whose files are malformed."""


class TrainingError(MorphkitError, RuntimeError):
    """Training cannot continue (NaN/inf loss or gradient)."""


class MissingDependencyError(MorphkitError, ImportError):
    """An optional package a feature needs is not installed (the message names the pip command)."""
