"""Block importance: how much a decoder block changes the hidden state it reads (ShortGPT's Block Influence).

BI_i = 1 - mean over calibration tokens of cos(x_i, y_i), where x_i is the hidden state block i reads and y_i
the one it writes (x_i plus its attention and FFN contributions). Men et al. 2024 ("ShortGPT: Layers in Large
Language Models are More Redundant Than You Expect") found that removing the blocks of lowest BI costs least:
a block whose output points where its input did changes little of what the following blocks read, and
removing it is exactly replacing its output by its input. One pass of the dense model over calibration windows
(the TRAIN part), computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from prune.structural.layout import Structure


@torch.no_grad()
def block_importance(model: nn.Module, structure: Structure, calibration: Tensor) -> Tensor:
    """BI per block (float64, [num_layers]) over every token of the calibration windows [n, seq_len]."""
    blocks = model.get_submodule(structure.blocks)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    inputs: dict[int, Tensor] = {}

    def read_input(index: int):
        def hook(module, args, kwargs):
            inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def compare_output(index: int):
        def hook(module, args, kwargs, output):
            written = output if isinstance(output, Tensor) else output[0]
            cosine = F.cosine_similarity(inputs.pop(index).float(), written.float(), dim=-1)
            sums[index] += cosine.sum().double().cpu()

        return hook

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(read_input(index), with_kwargs=True))
        handles.append(block.register_forward_hook(compare_output(index), with_kwargs=True))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for window in tqdm(calibration, desc="block importance (train windows)", leave=False):
            model(input_ids=window[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return 1.0 - sums / calibration.numel()
