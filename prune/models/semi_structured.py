"""`prune.to_semi_structured`: run a 2:4-pruned model on PyTorch's 2:4 sparse kernels, where they exist.

A merged 2:4 model is a dense checkpoint; vLLM and llm-compressor dropped their 2:4 paths, so it is served
dense there. What is left on GPUs is PyTorch's semi-structured tensors (cuSPARSELt / CUTLASS; NVIDIA, compute
capability 8.0+, float16/bfloat16). The conversion itself lives in eval/semi_structured.py, which measures it in
every 2:4 run's report (`semi_structured_kernel`) and never imports prune; this is its public face, which checks
the model first and refuses what the kernels cannot run with one message.
"""

from __future__ import annotations

import torch
from torch import nn

from eval.semi_structured import convert_linears, two_four_linears, unavailable_reason
from prune.core.errors import UserInputError, described

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Replace, in place, the weight of every nn.Linear whose weight is 2:4 sparse by a semi-structured sparse
    tensor, so its matmuls run on PyTorch's 2:4 kernels; returns the model. The model must be on an NVIDIA GPU of
    compute capability 8.0+ in float16 or bfloat16, and already merged (`prune.export`, `prune.oneshot`). For
    inference: the converted weights do not train, and save_pretrained cannot write them."""
    if not isinstance(model, nn.Module):
        raise UserInputError(f"model must be a torch model, got {described(model)}.")
    names = two_four_linears(model)
    if not names:
        raise UserInputError(
            "model has no nn.Linear whose weight is 2:4 sparse (at most 2 nonzeros in every group of 4 along the "
            "input); prune it to sparsity 2:4 and merge the masks first (prune.oneshot, or prune.export after "
            "prune.attach)."
        )
    weight = model.get_submodule(names[0]).weight
    if weight.device.type != "cuda":
        raise UserInputError(
            f"model is on {weight.device.type}; PyTorch's 2:4 kernels run on NVIDIA GPUs of compute capability 8.0+ "
            "only (anywhere else a 2:4 model runs dense). On such a GPU: model.to('cuda', torch.float16), then "
            "prune.to_semi_structured(model)."
        )
    reason = unavailable_reason(weight.device)
    if reason is not None:
        raise UserInputError(f"{reason}; the 2:4 kernels need compute capability 8.0+ (A100, H100 or newer).")
    if weight.dtype not in KERNEL_DTYPES:
        raise UserInputError(
            f"the 2:4 kernels run float16 or bfloat16 weights, and this model's are {weight.dtype}; convert it "
            "first: model.to(torch.float16)."
        )
    convert_linears(model, names)
    return model
