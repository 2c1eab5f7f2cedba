"""VIB's config and declaration (torch-free: a recipe is validated before torch is imported)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from prune.core.config import StrictConfig
from prune.methods.declaration import MethodDeclaration
from prune.structural.config import FFN, HEADS, HIDDEN, LAYERS, StructuralBudgetConfig


class Units(StrictConfig):
    """Which structural units are gated."""

    heads: bool = Field(True, description="attention heads (a GQA key/value group with its query heads)")
    ffn: bool = Field(True, description="FFN intermediate neurons")
    hidden: bool = Field(True, description="the hidden (embedding) dimension of the residual stream")
    layers: bool = Field(False, description="whole decoder layers")

    def kinds(self) -> set[str]:
        return {
            kind
            for kind, on in ((HEADS, self.heads), (FFN, self.ffn), (HIDDEN, self.hidden), (LAYERS, self.layers))
            if on
        }


class VIBConfig(StructuralBudgetConfig):
    """VIB structured pruning, trained to a size budget. A recipe usually also sets `export.round_to` (kept
    FFN / hidden sizes rounded to a multiple) and `train` (steps, lr): see recipes/smollm2-135m/vib-50.yaml."""

    units: Units = Field(default_factory=Units, description="which structural units are gated")
    kl_weight: float = Field(1.0, ge=0, description="weight of the mean KL per unit")
    mu_init: float = Field(1.0, description="initial gate mean")
    log_sigma2_init: float = Field(-9.0, description="initial gate log variance")
    keep_temperature: float = Field(
        1.0, gt=0, description="T in P(keep) = sigmoid(-log alpha / T), used in the expected size"
    )
    log_sigma2_lr_scale: float = Field(
        4.0, gt=0, description="log sigma^2 learning rate relative to train.lr (it lives in log space)"
    )
    target_warmup: float = Field(
        0.5, ge=0, le=1, description="share of the steps over which the target rises linearly from 0"
    )
    lagrangian_lr_scale: float = Field(10.0, gt=0, description="lambda1, lambda2 learning rate relative to train.lr")
    budget_value: Literal["hard", "expected"] = Field(
        "hard",
        description="the Lagrangian's s: the hard share with the expected share's gradient, or the expected share",
    )

    @model_validator(mode="after")
    def _some_units(self):
        if not self.units.kinds():
            raise ValueError("vib needs at least one unit kind on (units: heads, ffn, hidden, layers).")
        return self


VIB = MethodDeclaration("vib", VIBConfig, "learnable", "prune.methods.vib.method:VIB")
