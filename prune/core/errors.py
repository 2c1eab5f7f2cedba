"""The one error type for bad input: the CLI turns it into a one-paragraph message and exit code 2."""

from __future__ import annotations

import re


class UserInputError(Exception):
    """Input the user can fix: the message names the problem and what to pass instead."""


def summarize_names(names: list[str], shown: int = 3) -> str:
    """A long list of module names as one short phrase: the count, the first few names and the glob
    patterns that select them all (digits become `*`), so a message about 210 layers stays one paragraph."""
    patterns = list(dict.fromkeys(re.sub(r"\d+", "*", name) for name in names))
    head = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
    if len(names) <= shown:
        return head
    globs = ", ".join(repr(pattern) for pattern in patterns[:shown]) + (", ..." if len(patterns) > shown else "")
    return f"{len(names)} of them ({head}; selected by {globs})"


def described(value: object) -> str:
    """A wrong value as a message shows it: its type and the start of its repr (a whole tensor would not fit)."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
