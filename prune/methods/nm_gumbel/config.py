"""MaskLLM's config and declaration (torch-free: a recipe is validated before torch is imported)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from prune.core.config import MethodConfig
from prune.core.sparsity import parse_sparsity
from prune.methods.declaration import MethodDeclaration

ONESHOT_PRIORS = ("sparsegpt", "wanda", "magnitude")
MAX_CANDIDATES = 256


class NMGumbelConfig(MethodConfig):
    """MaskLLM's learnable N:M masks (Gumbel-softmax over the C(M,N) candidates of each group); the logits are
    what trains, with MaskPrune's one trainer (`train.steps`). The defaults are MaskLLM's scripts': tau 4 -> 0.05,
    kappa 1e2 -> 5e2, prior strength 3, weight regularization 1e-5."""

    sparsity: str | float = Field("2:4", description="N:M only (any N < M)")
    prior: str = Field(
        "sparsegpt", description="initial mask: sparsegpt | wanda | magnitude | none | a run directory (mask transfer)"
    )
    prior_strength: float = Field(
        3.0, ge=0, description="the prior candidate's lead, in units of init_std (noise-free logits)"
    )
    init_std: float = Field(0.01, gt=0, description="logit scale: the prior shift's unit; init std with prior none")
    tau_start: float = Field(4.0, description="Gumbel-softmax temperature at step 0")
    tau_end: float = Field(0.05, description="Gumbel-softmax temperature at the last step")
    kappa_start: float = Field(100.0, description="logit scale factor at step 0")
    kappa_end: float = Field(500.0, description="logit scale factor at the last step")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="how tau and kappa move")
    sparse_weight_reg: float = Field(
        1e-5, ge=0, description="lambda: loss -= lambda * (1 - t/T) * sum ||W ⊙ soft||^2 (0: off)"
    )
    prior_update_weights: bool = Field(
        False, description="apply SparseGPT's weight update (prior: sparsegpt) to the frozen weights before learning"
    )

    @field_validator("tau_start", "tau_end", "kappa_start", "kappa_end")
    @classmethod
    def _positive(cls, value: float, info):
        if not value > 0:
            what = "temperature (it divides the logits)" if info.field_name.startswith("tau") else "logit scale"
            raise ValueError(f"{info.field_name} must be > 0: it is the Gumbel-softmax {what}; got {value}.")
        return value

    @field_validator("prior")
    @classmethod
    def _known_prior(cls, value: str):
        looks_like_path = "/" in value or "\\" in value or Path(value).expanduser().is_dir()
        if value not in (*ONESHOT_PRIORS, "none") and not looks_like_path:
            raise ValueError(
                f"prior {value!r} is neither {', '.join(ONESHOT_PRIORS)}, none, nor a run directory "
                "(a path such as runs/my-run whose masks.safetensors to start from)."
            )
        return value

    @model_validator(mode="after")
    def _nm_only(self):
        pattern = parse_sparsity(self.sparsity)
        if not pattern.is_nm:
            raise ValueError(
                f"nm_gumbel learns N:M masks; use 2:4 (or another N:M such as 4:8), not the fraction "
                f"{self.sparsity}. For unstructured sparsity use magnitude, wanda or sparsegpt."
            )
        count = math.comb(pattern.m, pattern.n)
        if count > MAX_CANDIDATES:
            raise ValueError(
                f"{pattern} has {count} candidate patterns per group ({count / pattern.m:.0f} logits per weight); "
                f"nm_gumbel enumerates them and supports at most {MAX_CANDIDATES}, e.g. 2:4, 1:4, 4:8. For a "
                f"larger M use a one-shot method (magnitude, wanda, sparsegpt), which enumerates nothing."
            )
        if self.prior_update_weights and self.prior != "sparsegpt":
            raise ValueError("prior_update_weights applies SparseGPT's weight update; it needs prior: sparsegpt.")
        return self

    @property
    def changes_weights(self) -> bool:
        return self.prior_update_weights


NM_GUMBEL = MethodDeclaration("nm_gumbel", NMGumbelConfig, "learnable", "prune.methods.nm_gumbel.method:NM_GUMBEL")
