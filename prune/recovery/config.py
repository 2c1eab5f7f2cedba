"""The `recover` section of a recipe: the one trainer's settings (it is a TrainConfig) plus what recovery adds.

Torch-free, like every recipe section: a recipe validates without loading torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prune.core.config import INT64
from prune.training.config import TrainConfig


class RecoverConfig(TrainConfig):
    """Recovery training after the method: the kept weights train with the masks fixed, by the one trainer (its
    keys below, with defaults for weights instead of masks), so the pruned model wins back quality. `steps: 0`
    (the default) skips it. `mode: lora` trains peft LoRA adapters on the targets, whose update is masked by each
    layer's mask (a 2:4 layer stays exactly 2:4) and merged at the end; `mode: full` trains the targets' kept
    weights themselves, gradients and updates masked. Structurally shrunk models (vib, structured) have no masks
    left: LoRA or full training acts on the smaller model. The saved model/ is the recovered one."""

    steps: int = Field(0, ge=0, description="optimizer steps of recovery training after the method (0: no recovery)")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of what recovery trains (LoRA factors or weights)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of what recovery trains")
    eval_every: int = Field(
        0, ge=0, description="validation perplexity (error) every N steps, the best step is kept (0: off, the last)"
    )
    seed: int = Field(0, ge=0, lt=INT64, description="seed of the data order and of the LoRA factors' initial values")
    mode: Literal["lora", "full"] = Field(
        "lora", description="lora: masked LoRA adapters, merged at the end; full: the kept weights themselves"
    )
    rank: int = Field(16, ge=1, description="lora: rank r of the adapters")
    alpha: float = Field(32.0, gt=0, description="lora: scale alpha (the update is alpha / r · B A)")
    targets: list[str] | None = Field(
        None,
        description="glob patterns over the Linear modules that train (null: the pruned layers; after a "
        "structural method, every linear inside the decoder blocks)",
    )
