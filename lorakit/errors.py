"""Errors lorakit raises on bad input.

Every error a user can cause is a :class:`LorakitError` (or a subclass) whose message says
what is wrong and what to do. The CLI prints these without a traceback and exits with 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LorakitError(Exception):
    """Base class of every error lorakit raises on bad input or a bad environment."""


class ConfigError(LorakitError, ValueError):
    """A configuration value is invalid (unknown key, wrong type, out of range)."""


class ModelLoadError(LorakitError):
    """A base model could not be found or loaded."""


class AdapterError(LorakitError):
    """An adapter could not be created, saved or loaded."""


class DataError(LorakitError):
    """A data file is malformed or unusable."""


class ExportError(LorakitError):
    """An export cannot be done or failed its check (parity gate, unsupported architecture,
    output already there)."""


def did_you_mean(name: str, choices) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
