"""Will the model fit? Checked from config.json before any weight is read, so a model that cannot fit ends with
exit 2, the figures and the fix, instead of the OOM killer.

The parameter count comes from the architecture built on the meta device (accelerate's `init_empty_weights`:
exact for any transformers architecture, no memory); the bytes are that count times the chosen dtype's size.
What must fit where depends on `runtime.offload`: the whole model on the device (none), the whole model in RAM
and one block on the device (cpu), one block in RAM (disk).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from prune.core.errors import UserInputError
from prune.models.blocks import find_blocks
from prune.models.loading import checkpoint_errors
from prune.models.runtime import Runtime

GB = 1024**3


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    largest_block_parameters: int

    def bytes(self, dtype: torch.dtype) -> int:
        return self.parameters * dtype.itemsize

    def block_bytes(self, dtype: torch.dtype) -> int:
        return self.largest_block_parameters * dtype.itemsize


def model_size(model_dir: Path) -> ModelSize:
    """Parameter counts of the model a directory's config.json describes (no weight is read)."""
    with checkpoint_errors(str(model_dir)):
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    _, blocks = find_blocks(model)
    largest = max((sum(p.numel() for p in block.parameters()) for block in blocks), default=0)
    return ModelSize(sum(p.numel() for p in model.parameters()), largest)


def available_ram() -> int:
    """Bytes of RAM this process can still get without swapping (MemAvailable: free + reclaimable cache)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_device_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator; None for the CPU (its memory is the RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def check_fit(size: ModelSize, runtime: Runtime, free_ram: int, free_device: int | None) -> None:
    """UserInputError with the figures and the fix when the model cannot be held the way `runtime` says."""
    dtype_name = str(runtime.dtype).removeprefix("torch.")
    whole, block = size.bytes(runtime.dtype), size.block_bytes(runtime.dtype)
    needs: list[tuple[str, int, int]] = []  # (where, bytes needed, bytes free)
    on_device = free_device is not None
    if runtime.offload == "none":
        needs.append((str(runtime.device), whole, free_device) if on_device else ("RAM", whole, free_ram))
    elif runtime.offload == "cpu":
        needs.append(("RAM", whole, free_ram))
        if on_device:
            needs.append((str(runtime.device), block, free_device))
    else:  # disk: one block resident
        needs.append(("RAM", block, free_ram))
        if on_device:
            needs.append((str(runtime.device), block, free_device))
    for where, need, free in needs:
        if need > free:
            raise UserInputError(
                f"the model does not fit: {size.parameters / 1e9:.2f}B parameters are {whole / GB:.2f} GB in "
                f"{dtype_name} (largest block {block / GB:.2f} GB); with runtime.offload: {runtime.offload} it "
                f"needs {need / GB:.2f} GB of {where}, and {free / GB:.2f} GB is free. Use a smaller runtime.dtype "
                "(bfloat16 halves float32), runtime.offload: "
                f"{'disk' if runtime.offload != 'disk' else 'disk with fewer calibration samples'} "
                f"(one block in memory at a time), or another device."
            )


def preflight(model_dir: Path, runtime: Runtime) -> ModelSize:
    """Check that the model in `model_dir` fits as `runtime` says, on this machine, now."""
    size = model_size(model_dir)
    check_fit(size, runtime, available_ram(), available_device_memory(runtime.device))
    return size
