"""Error types of the evaluation layer.

Each one subclasses a builtin so callers that do not know this module still catch them sensibly
(`except ValueError`, `except ArithmeticError`).
"""

from __future__ import annotations


class NonFiniteError(ArithmeticError):
    """A metric came out NaN or infinite: reported as an error, never printed as a number."""


class TaskUnavailableError(ValueError):
    """An accuracy task cannot run: unknown name, or its dataset cannot be fetched (hub unreachable)."""
