"""Where and in what precision a run computes: the recipe's `runtime:` section, resolved against this machine.

    runtime:
      device: auto      # auto (first accelerator, else cpu) | cpu | cuda | cuda:N | mps
      dtype: auto       # auto (the checkpoint's) | float32 | bfloat16 | float16
      threads: null     # CPU threads for torch (null: torch's default)
      offload: none     # none | cpu (model in RAM, one block on the device) | disk (streamed from safetensors shards)

The section's schema is RuntimeConfig (prune.models.runtime_config, torch-free). `resolve_runtime` turns it into a
`Runtime` (a real torch.device and dtype) and refuses, before anything is loaded or written, what this machine
cannot do: a device that is not there, float16 on a CPU (PyTorch's CPU float16 matmuls are slow and some ops are
missing; bfloat16 is the CPU's half precision).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from prune.core.errors import UserInputError
from prune.models.runtime_config import RuntimeConfig

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    offload: str

    @property
    def streams(self) -> bool:
        return self.offload == "disk"


def resolve_device(name: str) -> torch.device:
    """The torch.device `name` stands for on this machine; UserInputError when it is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            found = f"{count} CUDA device(s)" if count else "no CUDA device (or a CPU-only PyTorch build)"
            raise UserInputError(
                f"runtime.device {name!r} is not available: this machine has {found}; use runtime.device: cpu "
                f"(or auto){', or cuda:0..cuda:' + str(count - 1) if count else ''}."
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(
            "runtime.device 'mps' is not available on this machine; use runtime.device: cpu (or auto)."
        )
    return device


def checkpoint_dtype(config_file: Path | None) -> torch.dtype:
    """The dtype a config.json names (`dtype`, formerly `torch_dtype`); float32 when it names none."""
    if config_file is None or not config_file.is_file():
        return torch.float32
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise UserInputError(
            f"{config_file} is not JSON ({error}): the model's config is damaged. Put the checkpoint's own "
            "config.json back, or save the model again with save_pretrained."
        ) from None
    if not isinstance(config, dict):
        raise UserInputError(f"{config_file} holds no JSON object; save the model again with save_pretrained.")
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(str(name), torch.float32)


def resolve_runtime(config: RuntimeConfig, config_file: Path | None = None) -> Runtime:
    """Check `config` against this machine; `config_file` (the model's config.json) decides `dtype: auto`."""
    device = resolve_device(config.device)
    dtype = checkpoint_dtype(config_file) if config.dtype == "auto" else DTYPES[config.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        origin = "the checkpoint's dtype (runtime.dtype: auto)" if config.dtype == "auto" else "runtime.dtype"
        raise UserInputError(
            f"{origin} is float16, which PyTorch runs slowly and incompletely on a CPU; use runtime.dtype: "
            "bfloat16 (the CPU's half precision) or float32, or a CUDA device."
        )
    return Runtime(device, dtype, config.offload)


def apply_threads(config: RuntimeConfig) -> None:
    """torch's intra-op threads for this process (a shared CPU runs faster with fewer, see README)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
