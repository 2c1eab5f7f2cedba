"""Hub ids versus local paths, and one clear error, raised at once, when the Hub is needed but unreachable."""

from __future__ import annotations

import re

from eval.hub_probe import hub_reachable
from prune.core.errors import UserInputError

__all__ = ["hub_reachable", "looks_like_hub_id", "require_hub"]
# "name" or "org/name": what the Hub accepts as a repository id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def looks_like_hub_id(name: str) -> bool:
    """True for "name" or "org/name" as the Hub spells them; ./x, /x, ~/x, a/b/c and names with '..' are paths."""
    return bool(_HUB_ID.match(name)) and ".." not in name


def require_hub(what: str, instead: str) -> None:
    """Raise UserInputError at once when `what` needs the Hub and it is unreachable; `instead` says what to pass."""
    if not hub_reachable():
        raise UserInputError(
            f"{what} needs the Hugging Face Hub, which is unreachable from here "
            f"(no network, or HF_HUB_OFFLINE=1). Instead, {instead}."
        )
