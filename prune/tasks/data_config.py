"""The recipe's `data` section of each task, by the recipe's `task:` value (torch-free, so a recipe is validated, and
a bad one refused, before torch is imported; the Task classes themselves are in prune.tasks.registry)."""

from __future__ import annotations

from pydantic import Field, field_validator

from prune.core.config import StrictConfig
from prune.data.config import DataConfig, ImageDataConfig

DEFAULT_TASK = "causal-lm"


class ZeroShotDataConfig(ImageDataConfig):
    """The `data` section when `task: zero-shot-classification`: an image source (ImageDataConfig) and the
    prompts that turn class names into CLIP's classifier."""

    shots: int | None = Field(16, ge=1, description="training images per class (seeded); null: all")
    templates: list[str] = Field(
        default_factory=lambda: ["a photo of a {}."],
        description="prompt templates, each with one {} for the class name",
    )

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, templates: list[str]) -> list[str]:
        bad = [template for template in templates if template.count("{}") != 1]
        if not templates or bad:
            raise ValueError(
                f"every prompt template needs exactly one '{{}}' for the class name; got {bad or templates}."
            )
        return templates


DATA_CONFIGS: dict[str, type[StrictConfig]] = {
    "causal-lm": DataConfig,
    "zero-shot-classification": ZeroShotDataConfig,
    "image-classification": ImageDataConfig,
}
