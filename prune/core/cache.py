"""Where MaskPrune keeps what it fetches once (the embedded model, the general-prose text): one root to delete."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$MASKPRUNE_CACHE`, else ~/.cache/maskprune: one place to delete to reclaim the disk."""
    return Path(os.environ.get("MASKPRUNE_CACHE") or Path.home() / ".cache" / "maskprune").expanduser()
