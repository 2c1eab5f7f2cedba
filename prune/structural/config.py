"""The config keys every structural method shares, and the names of the units they prune (torch-free: a recipe
is validated before torch is imported)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from prune.core.config import MethodConfig
from prune.core.errors import UserInputError

HIDDEN, HEADS, FFN, LAYERS = "hidden", "heads", "ffn", "layers"  # the kinds of structural unit
QUANTITIES = ("params", "flops")


def parse_budget(value) -> dict[str, float]:
    """{params: t} or {flops: t}, t the share removed in (0, 1)."""
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in QUANTITIES:
        raise ValueError(f"target must be one of {{params: t}} or {{flops: t}} (t = the share removed), got {value!r}")
    quantity, share = next(iter(value.items()))
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
        raise ValueError(f"target {quantity} must be a share removed strictly between 0 and 1, got {share!r}")
    return {quantity: float(share)}


class StructuralBudgetConfig(MethodConfig):
    """Keys every structural method shares: a size/FLOPs target instead of an N:M/fraction sparsity."""

    sparsity: str | float | None = Field(
        None, description="unused: the budget is `target` (a fraction here means params)"
    )
    targets: list[str] | None = Field(
        None, description="unused: structural methods prune units (see `units`), not chosen linears"
    )
    skip_incompatible: bool = Field(False, description="unused: no N:M groups here")
    target: dict[str, float] = Field(
        default_factory=lambda: {"params": 0.5}, description="{params: t} or {flops: t}: the share removed"
    )
    flops_seq_len: int = Field(512, ge=1, description="sequence length at which FLOPs are counted")
    round_to: int | None = Field(
        None, ge=1, description="round kept FFN / hidden sizes to a multiple (export.round_to)"
    )
    uniform: bool = Field(False, description="the same sizes in every layer, so plain transformers loads the export")

    @field_validator("sparsity", mode="before")
    @classmethod
    def _valid_sparsity(cls, value):
        if value is None or isinstance(value, float) and 0.0 < value < 1.0:
            return value
        raise ValueError(
            f"structural methods take a size budget, `target: {{params: 0.5}}` or `{{flops: 0.5}}`, not sparsity "
            f"{value!r}; drop `sparsity` (a plain fraction such as 0.5 is read as a params target)."
        )

    @field_validator("target", mode="before")
    @classmethod
    def _valid_budget(cls, value):
        return parse_budget(value)

    @model_validator(mode="after")
    def _sparsity_as_budget(self):
        if self.targets is not None:
            raise ValueError("structural methods prune units, not chosen linears: drop `targets` and use `units`.")
        if isinstance(self.sparsity, float) and "target" not in self.model_fields_set:
            object.__setattr__(self, "target", {"params": self.sparsity})
        return self

    @property
    def pattern(self):
        raise UserInputError(f"method {self.name} has a size target ({self.target_label()}), not an N:M pattern.")

    @property
    def quantity(self) -> str:
        return next(iter(self.target))

    @property
    def share(self) -> float:
        return self.target[self.quantity]

    def target_label(self) -> str:
        return f"{self.quantity} {self.share:g}"
