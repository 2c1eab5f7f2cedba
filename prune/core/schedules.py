"""Values that move from a start to an end over training: temperatures, scales, targets."""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["linear", "cosine", "constant"]


def scheduled(start: float, end: float, progress: float, kind: ScheduleKind = "linear") -> float:
    """The value at `progress` in [0, 1]: linear interpolation, a cosine ease, or `start` throughout."""
    progress = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return start
    if kind == "cosine":
        progress = (1.0 - math.cos(math.pi * progress)) / 2.0
    return start + (end - start) * progress
