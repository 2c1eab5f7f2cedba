"""Tensors read from a file must fit the tensors they are loaded into: same names, shapes and dtypes.

`copy_` broadcasts ([1, 3, 8, 8] fills all of [128, 3, 8, 8]) and casts silently, so a wrong file would load
without a word; every load of saved parameters checks the fit first and names what does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from prune.core.errors import UserInputError

SHOWN = 3  # problems listed by name; the rest are counted


def describe(tensor: Tensor) -> str:
    return f"{list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def check_fit(found: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str, fix: str) -> None:
    """Raise UserInputError unless `found` holds exactly the names of `expected`, each with its shape and dtype.
    The message names `source`, the first few tensors that differ (expected and found) and ends with `fix`."""
    wrong = [
        f"{name} (expected {describe(expected[name])}, found {describe(found[name])})"
        for name in expected
        if name in found and (found[name].shape != expected[name].shape or found[name].dtype != expected[name].dtype)
    ]
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if not (wrong or missing or unexpected):
        return
    problems = "; ".join(
        filter(
            None,
            [
                f"shape or dtype differs for {_listed(wrong)}" if wrong else "",
                f"missing {_listed(missing)}" if missing else "",
                f"not in this model: {_listed(unexpected)}" if unexpected else "",
            ],
        )
    )
    raise UserInputError(f"{source} does not fit this model: {problems}. {fix}")
