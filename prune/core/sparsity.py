"""A sparsity target: either N:M (N kept in every group of M along the input dimension) or a fraction removed."""

from __future__ import annotations

from dataclasses import dataclass

from prune.core.errors import UserInputError


@dataclass(frozen=True)
class Sparsity:
    """`n`/`m` set for N:M patterns, `fraction` set for unstructured sparsity (the share of weights removed)."""

    n: int | None = None
    m: int | None = None
    fraction: float | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def removed_fraction(self) -> float:
        """The share of targeted weights set to zero."""
        return 1.0 - self.n / self.m if self.is_nm else self.fraction

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:g}"


def parse_sparsity(value: str | float | int) -> Sparsity:
    """Read "2:4" (N:M) or a fraction in (0, 1) such as 0.5 or "50%"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        raise UserInputError(
            f"sparsity {value} is an integer; if you wrote 2:4 unquoted, YAML 1.1 read it as base-60 "
            f"({value}). Quote it ('2:4') or load recipes with prune.runs.recipe.load_recipe, which keeps it a string."
        )
    text = str(value).strip()
    if ":" in text:
        n_text, _, m_text = text.partition(":")
        try:
            n, m = int(n_text), int(m_text)
        except ValueError:
            raise UserInputError(f"sparsity {text!r} is not N:M with integers, e.g. '2:4'.") from None
        if not 0 < n < m:
            raise UserInputError(f"sparsity {text!r}: N:M needs 0 < N < M (e.g. 2:4, 4:8).")
        return Sparsity(n=n, m=m)
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UserInputError(f"sparsity {text!r} is neither N:M ('2:4') nor a fraction (0.5).") from None
    if not 0.0 < fraction < 1.0:
        raise UserInputError(f"sparsity {text!r}: a fraction must lie strictly between 0 and 1.")
    return Sparsity(fraction=fraction)
