"""What every plot shares: matplotlib without a display (Agg), a finite-number test, and saving a figure.

matplotlib is the `plots` extra: it is imported here, when a figure is drawn, never when `prune` is imported;
runs that draw one check for it before they start (`prune.core.extras.require("matplotlib", ...)`)."""

from __future__ import annotations

import math
from pathlib import Path

from prune.core.atomic import replacing


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(*args, **kwargs):
    """`matplotlib.pyplot.subplots`, on the Agg backend."""
    return _pyplot().subplots(*args, **kwargs)


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
        _pyplot().close(fig)
    return path
