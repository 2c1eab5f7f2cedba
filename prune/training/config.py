"""The `train` section of a recipe: the one trainer's settings (torch-free: a recipe is validated before torch is
imported)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prune.core.config import INT64, StrictConfig


class TrainConfig(StrictConfig):
    """The one trainer's settings (learnable methods only)."""

    steps: int = Field(0, ge=0, description="optimizer steps for learnable methods; 0 for one-shot methods")
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-2, gt=0, description="AdamW learning rate of the mask parameters")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the mask parameters")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of steps with linear warmup")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0: off)")
    log_every: int = Field(10, ge=1, description="a train_log.jsonl line every N steps")
    eval_every: int = Field(0, ge=0, description="held-out perplexity of the hard masks every N steps (0: off)")
    eval_windows: int = Field(
        8, ge=1, description="validation windows of the periodic evaluation (and of depth's choice of blocks)"
    )
    checkpoint_every: int = Field(50, ge=1, description="a resumable checkpoint every N steps")
    seed: int = Field(0, ge=0, lt=INT64, description="seed of the data order and of the masks' random draws")
    distill: float = Field(
        0.0,
        ge=0,
        le=1,
        description="causal-lm: weight of the KL divergence from the dense "
        "model's next-token distribution (a frozen copy of the unpruned model), the rest on the "
        "next-token cross-entropy; 0: cross-entropy only, 1: distillation only",
    )
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto: bf16 autocast when training on a CUDA device that has it (runtime.device)"
    )
