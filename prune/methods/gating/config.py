"""Dynamic gating's config and declaration (torch-free: a recipe is validated before torch is imported)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from prune.core.config import MethodConfig
from prune.core.errors import UserInputError
from prune.methods.declaration import MethodDeclaration


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0 and math.isfinite(threshold)):
        raise UserInputError(
            f"gating threshold r={threshold!r} is outside (0, 1]; r is the share of activation mass the kept "
            "channels may hold (0.9 keeps the channels holding the top 90%). Pass a value such as 0.9."
        )
    return float(threshold)


class GatingConfig(MethodConfig):
    """Dynamic gating (FTWT): a predictor per gated layer picks, per input, the channels to compute."""

    sparsity: str | float = Field(0.5, description="target: uniform only -- the fraction of channels each input skips")
    targets: list[str] | None = Field(
        None,
        description="glob patterns over module names, e.g. ['*.mlp'] (null: "
        "every transformer FFN, else every Conv2d+BN block); every pattern must match",
    )
    target: Literal["mass", "uniform"] = Field(
        "mass",
        description="how the BCE labels are chosen: mass keeps the k(x) "
        "channels holding <= r of the activation mass, uniform a fixed share",
    )
    threshold: float = Field(0.9, description="r in (0, 1]: the activation mass the kept channels may hold")
    mode: Literal["decoupled", "joint"] = Field(
        "decoupled", description="decoupled: predictor input detached, backbone frozen; joint: the backbone trains too"
    )
    loss_weight: float = Field(1.0, ge=0, description="w, the weight of the BCE loss")
    cooldown: float = Field(
        1.0, gt=0, le=1, description="fraction of the steps after which w drops to 0 (FTWT: 0.5 in joint mode)"
    )
    softmax: bool = Field(True, description="softmax over the pooled input channels before the linear map (FTWT)")
    predictor_rank: int | None = Field(
        None, ge=1, description="null: one linear map (FTWT); an int: a low-rank pair, cheaper for wide FFNs"
    )
    init_bias: float = Field(3.0, description="initial logit of every channel (positive: start dense)")
    train_masked: bool = Field(True, description="training forward passes the masked output on (FTWT's code does)")
    max_union: float = Field(
        0.9, ge=0, le=1, description="FFN sparse path: above this union of selected neurons, run masked dense"
    )
    backbone_lr_scale: float = Field(
        0.1, gt=0, description="joint mode: the backbone's learning rate is train.lr times this"
    )

    @field_validator("threshold")
    @classmethod
    def _threshold_in_range(cls, value: float) -> float:
        try:
            return check_threshold(value)
        except UserInputError as error:
            raise ValueError(str(error)) from None

    @model_validator(mode="after")
    def _uniform_needs_fraction(self):
        if self.target == "uniform" and self.pattern.is_nm:
            raise ValueError(f"target: uniform needs method.sparsity as a fraction such as 0.5, not {self.sparsity!r}.")
        return self

    def target_label(self) -> str:
        return f"r={self.threshold:g}" if self.target == "mass" else f"uniform {self.pattern}"

    @property
    def changes_weights(self) -> bool:
        return self.mode == "joint"


PREDICTORS_FILE = "predictors.safetensors"
GATING_FILE = "gating.json"

GATING = MethodDeclaration(
    "gating",
    GatingConfig,
    "learnable",
    "prune.methods.gating.method:GATING",
    tasks=frozenset({"causal-lm", "image-classification"}),
    plain_model=False,
    saved_files=(PREDICTORS_FILE, GATING_FILE),
)
