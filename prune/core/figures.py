"""What every plot shares: matplotlib without a display (Agg), a finite-number test, and saving a figure."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from prune.core.atomic import replacing  # noqa: E402


def is_finite_number(value) -> bool:
    """A real, finite number (not a bool, not NaN/inf): what a plot can draw."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (creating the folder) and close `fig`; returns the path written."""
    path = Path(path)
    fig.tight_layout()
    try:
        with replacing(path) as tmp:  # whole or absent, like every file MaskPrune writes
            fig.savefig(tmp, dpi=110, format=path.suffix.removeprefix(".") or "png")
    finally:
        plt.close(fig)
    return path
