"""R-AMT's config and declaration (torch-free: a recipe is validated before torch is imported)."""

from __future__ import annotations

from pydantic import Field, model_validator

from prune.core.config import MethodConfig
from prune.methods.declaration import MethodDeclaration

DEFAULT_TARGETS = [
    "*vision_model.encoder.layers.*.self_attn.*_proj",  # q, k, v and out projections of the image encoder
    "*vision_model.embeddings.patch_embedding",
]


class BinaryConfig(MethodConfig):
    """R-AMT's binary mask tuning on a frozen CLIP.

    Targets are globs over module names (nn.Linear and nn.Conv2d); e.g. add "*vision_model.encoder.layers.*.mlp.*"
    for the image MLPs or "*text_model.encoder.layers.*.self_attn.*_proj" for the text encoder. Inside a peft
    model the mask goes on each LoRA layer's frozen `base_layer`.
    """

    name: str = Field("binary", description="the method")
    sparsity: str | float = Field("2:4", description="unused: how much is masked is learned, and reported")
    targets: list[str] | None = Field(
        default_factory=lambda: list(DEFAULT_TARGETS), description="glob patterns over module names (Linear, Conv2d)"
    )
    init_score: float = Field(
        1e-2, description="initial score of every weight, above the threshold: step 0 is the zero-shot model"
    )
    threshold: float = Field(5e-3, description="a weight is kept where its score exceeds this")
    score_reg: float = Field(1e-4, ge=0, description="weight of the L2 norm (not squared) of the scores")
    gradient_dropout: float = Field(
        0.3, ge=0, le=1, description="lambda of gradient dropout (0: off, plain straight-through scores)"
    )
    kl_temperature: float = Field(1.0, gt=0, description="temperature of the KL to the zero-shot model")

    @model_validator(mode="after")
    def _consistent(self):
        if self.init_score <= self.threshold:
            raise ValueError(
                f"init_score ({self.init_score}) must exceed threshold ({self.threshold}), or tuning would not start "
                "from the zero-shot model (every weight would begin masked)."
            )
        if "sparsity" in self.model_fields_set and self.sparsity != type(self).model_fields["sparsity"].default:
            raise ValueError("binary mask tuning learns how much to mask; remove method.sparsity.")
        if not self.targets:
            raise ValueError(
                "method.targets must name at least one pattern, e.g. '*vision_model.encoder.layers.*.self_attn.*_proj'."
            )
        return self

    def target_label(self) -> str:
        return "mask tuning"


BINARY = MethodDeclaration(
    "binary",
    BinaryConfig,
    "learnable",
    "prune.methods.binary.method:BINARY",
    tasks=frozenset({"zero-shot-classification", "image-classification"}),
)
