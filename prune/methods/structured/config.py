"""The structured baseline's config and declaration (torch-free: a recipe is validated before torch is imported)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prune.core.config import StrictConfig
from prune.methods.declaration import MethodDeclaration
from prune.structural.config import FFN, HEADS, StructuralBudgetConfig


class BaselineUnits(StrictConfig):
    """Which structural units the baseline removes."""

    heads: bool = Field(True, description="remove attention head units")
    ffn: bool = Field(True, description="remove FFN neurons")


class StructuredConfig(StructuralBudgetConfig):
    """One-shot structured baseline: units ranked by a score, the same share removed in every layer."""

    score: Literal["magnitude", "activation"] = Field(
        "magnitude", description="weight L2 norm, or Wanda-style |W|*||X||"
    )
    units: BaselineUnits = Field(default_factory=BaselineUnits, description="which structural units are removed")

    def kinds(self) -> set[str]:
        return {kind for kind, on in ((HEADS, self.units.heads), (FFN, self.units.ffn)) if on}


STRUCTURED = MethodDeclaration("structured", StructuredConfig, "oneshot", "prune.methods.structured.method:STRUCTURED")
