"""Magnitude pruning: a weight's importance is its absolute value."""

from __future__ import annotations

from torch import Tensor


def magnitude_scores(weight: Tensor) -> Tensor:
    """|W| in float32, same shape as `weight` ([out, in])."""
    return weight.detach().float().abs()
