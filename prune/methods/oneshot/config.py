"""The one-shot methods' configs and declarations (torch-free: a recipe is validated before torch is imported)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prune.core.config import MethodConfig
from prune.methods.declaration import MethodDeclaration


class MagnitudeConfig(MethodConfig):
    """Keep the largest |W|: no calibration data."""

    granularity: Literal["layer", "row"] = Field("layer", description="rank weights over the layer or per row")


class WandaConfig(MethodConfig):
    """Keep the largest |W| * ||X|| (calibration activations), ranked per output row as in the paper."""

    granularity: Literal["layer", "row"] = Field("row", description="rank weights over the layer or per row")


class SparseGPTConfig(MethodConfig):
    """SparseGPT: OBS mask selection from the calibration Hessian, re-fitting the surviving weights."""

    update_weights: bool = Field(True, description="re-fit surviving weights (False: SparseGPT's mask only)")
    blocksize: int = Field(128, ge=1, description="columns per OBS block")
    dampening: float = Field(0.01, gt=0, description="fraction of mean(diag H) added to the diagonal")

    @property
    def changes_weights(self) -> bool:
        return self.update_weights


MAGNITUDE = MethodDeclaration(
    "magnitude",
    MagnitudeConfig,
    "oneshot",
    "prune.methods.oneshot.method:MAGNITUDE",
    tasks=frozenset({"causal-lm", "zero-shot-classification"}),
    statistics="none",
)
WANDA = MethodDeclaration("wanda", WandaConfig, "oneshot", "prune.methods.oneshot.method:WANDA", statistics="norms")
SPARSEGPT = MethodDeclaration(
    "sparsegpt", SparseGPTConfig, "oneshot", "prune.methods.oneshot.method:SPARSEGPT", statistics="hessian"
)
