"""The config base classes: a strict section (unknown keys are errors) and the keys every method shares."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prune.core.errors import UserInputError
from prune.core.sparsity import Sparsity, parse_sparsity


class StrictConfig(BaseModel):
    """A config section whose unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodConfig(StrictConfig):
    """Keys every method shares. Sample YAML:

        method:
          name: wanda
          sparsity: 2:4            # N:M, or a fraction removed such as 0.5
          targets: ["*.mlp.*"]     # glob patterns over module names; default: every linear in the blocks
          skip_incompatible: false # N:M layers whose input size is not a multiple of M: error, or skip them
    """

    name: str
    sparsity: str | float = Field("2:4", description="'N:M' or a fraction of the targeted weights removed")
    targets: list[str] | None = Field(None, description="glob patterns over module names")
    skip_incompatible: bool = Field(False, description="skip layers whose input size is not divisible by M")

    @field_validator("sparsity", mode="before")
    @classmethod
    def _valid_sparsity(cls, value):
        try:
            parse_sparsity(value)
        except UserInputError as error:
            raise ValueError(str(error)) from None
        return value

    @property
    def pattern(self) -> Sparsity:
        return parse_sparsity(self.sparsity)

    def target_label(self) -> str:
        """How reports name the target (a method whose target is not an N:M/fraction sparsity overrides it)."""
        return str(self.pattern)

    @property
    def changes_weights(self) -> bool:
        """True when the method also rewrites weights, so the saved masks alone cannot rebuild the model."""
        return False
