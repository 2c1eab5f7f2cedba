"""The depth method's config and declaration (torch-free: a recipe is validated before torch is imported): how
many decoder blocks go, how they are chosen, and optional width pruning.

`remove` is a count of blocks (an integer, e.g. 6) or a share of them (a fraction below 1, e.g. 0.2, rounded to
the nearest count); at least one block must go and one must stay. `width` adds structured's one-shot width
pruning of the kept blocks (its keys: target, score, units, round_to, uniform); its `target` is the share of
the whole dense model removed, the dropped blocks included.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from prune.core.config import MethodConfig
from prune.core.errors import UserInputError
from prune.methods.declaration import MethodDeclaration
from prune.methods.structured.config import StructuredConfig


class DepthConfig(MethodConfig):
    """Depth pruning: whole decoder blocks removed (ShortGPT's block importance on calibration windows, the set
    chosen greedily on validation windows), exported as a plain transformers model with fewer layers."""

    sparsity: None = Field(None, description="unused: depth removes `remove` blocks")
    targets: None = Field(None, description="unused: depth removes whole blocks, not chosen linears")
    skip_incompatible: bool = Field(False, description="unused: no N:M groups here")
    remove: int | float = Field(0.2, description="blocks removed: a count (e.g. 6) or a share of the blocks (0.2)")
    score: Literal["cosine"] = Field(
        "cosine", description="block importance: 1 - cosine(block input, block output), ShortGPT's Block Influence"
    )
    candidates: int = Field(
        3, ge=1, description="blocks tried on validation per greedy step, lowest importance first (1: the score alone)"
    )
    width: StructuredConfig | None = Field(
        None, description="structured width pruning of the kept blocks (target counts the dropped blocks too)"
    )

    @field_validator("sparsity", "targets", mode="before")
    @classmethod
    def _valid_sparsity(cls, value, info):  # named as MethodConfig's, which it replaces
        if value is not None:
            raise ValueError(
                f"depth removes whole blocks: drop `{info.field_name}` and say how many blocks go with `remove` "
                "(a count such as 6, or a share such as 0.2)."
            )
        return value

    @field_validator("remove", mode="before")
    @classmethod
    def _valid_remove(cls, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"remove must be a count of blocks (e.g. 6) or a share below 1 (e.g. 0.2), got {value!r}")
        if isinstance(value, float) and not 0.0 < value < 1.0:
            raise ValueError(
                f"remove {value!r}: a share of the blocks must lie strictly between 0 and 1 (removing every block "
                "leaves no model); write a count as an integer (e.g. remove: 2)."
            )
        if isinstance(value, int) and value < 1:
            raise ValueError(f"remove {value}: at least one block must go.")
        return value

    @field_validator("width", mode="before")
    @classmethod
    def _width_is_structured(cls, value):
        if isinstance(value, dict):
            name = value.get("name", "structured")
            if name != "structured":
                raise ValueError(
                    f"width pruning with depth is structured's one-shot pruning (its keys: target, score, units, "
                    f"round_to, uniform), not {name!r}; for learned layer gates use vib with units.layers."
                )
            return {**value, "name": "structured"}
        return value

    @property
    def pattern(self):
        raise UserInputError(f"method depth removes {self.target_label()}, not an N:M pattern.")

    def target_label(self) -> str:
        count = f"{self.remove} block" + ("s" if self.remove != 1 else "")
        label = count if isinstance(self.remove, int) else f"{self.remove:g} of the blocks"
        return label if self.width is None else f"{label} + width {self.width.target_label()}"

    def blocks_removed(self, blocks: int) -> int:
        """The count of blocks `remove` names in a model of `blocks` blocks (a share rounds to the nearest)."""
        count = self.remove if isinstance(self.remove, int) else round(self.remove * blocks)
        if not 1 <= count < blocks:
            raise UserInputError(
                f"depth remove {self.remove} removes {count} of the model's {blocks} blocks; at least one must go and "
                f"one must stay: use a count from 1 to {blocks - 1} or a share that rounds into that range."
            )
        return count


DEPTH = MethodDeclaration("depth", DepthConfig, "oneshot", "prune.methods.depth.method:DEPTH")
