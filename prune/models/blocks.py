"""Where a model keeps its repeated decoder/encoder blocks, and which of its modules count as linear layers.

Found by structure, not by model class, so that new architectures work without a table: the blocks are the
longest `nn.ModuleList` of the model (Llama's `model.layers`, GPT-2's `transformer.h`, CLIP's `encoder.layers`).
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from prune.core.errors import UserInputError

LINEAR_TYPES = (nn.Linear, Conv1D)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, module list) of the longest ModuleList: the model's stack of blocks."""
    candidates = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    if not candidates:
        raise UserInputError(
            f"{type(model).__name__} has no nn.ModuleList of blocks; pass explicit `method.targets` patterns."
        )
    return max(candidates, key=lambda item: len(item[1]))


def weight_matrix(module: nn.Module):
    """The weight as [out_features, in_features] (GPT-2's Conv1D stores it transposed)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    out_features, in_features = weight_matrix(module).shape
    return in_features, out_features
