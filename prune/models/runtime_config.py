"""The recipe's `runtime:` section (torch-free, so a recipe is validated before torch is imported); what it means on
this machine is resolved by prune.models.runtime."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from prune.core.config import StrictConfig

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class RuntimeConfig(StrictConfig):
    """The `runtime` section: where the model runs, in which dtype, and how much of it stays off the device."""

    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: the checkpoint's dtype (config.json), float32 when it names none"
    )
    threads: int | None = Field(None, ge=1, lt=2**31, description="CPU threads for torch (null: torch's default)")
    offload: Literal["none", "cpu", "disk"] = Field(
        "none",
        description="none: model on the device; cpu: model in RAM, one block at a time on the device; "
        "disk: one-shot methods stream blocks from safetensors shards and write shard by shard",
    )

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return value
