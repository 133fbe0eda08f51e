"""Errors raised by morphkit.

Every error a user can trigger is a :class:`MorphkitError`. Each subclass also
inherits the matching builtin, so ``except ValueError`` keeps working for code
that does not know morphkit. Messages say what was received, what was expected
and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "MorphkitError",
    "ConfigError",
    "UnsupportedModelError",
    "CheckpointError",
    "DataError",
    "TrainingError",
]


class MorphkitError(Exception):
    """Base class of every error morphkit raises on bad input or state."""


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
