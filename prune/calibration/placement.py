"""Block placements for the layer-by-layer driver: where a decoder block's weights wait for their turn.

`OnDevice`: the model sits in CPU memory (runtime.offload: cpu) and each block visits the work device for its
statistics, pruning and outputs, then returns to the CPU, as in SparseGPT's and Wanda's reference code.
`FromShards`: the model is a meta-device skeleton (runtime.offload: disk); a block's tensors are read from the
checkpoint's shards when its turn comes, and written to the output checkpoint and dropped when it is done.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import Tensor, nn

from prune.core.memory import release_freed_memory
from prune.models.shards import ShardedWriter, ShardReader

CPU = torch.device("cpu")


class OnDevice:
    """Blocks live on `home` (the CPU) and visit `device` one at a time."""

    def __init__(self, device: torch.device, home: torch.device = CPU):
        self.device, self.home = device, home

    def onload(self, index: int, block: nn.Module) -> None:
        block.to(self.device)

    def offload(self, index: int, block: nn.Module) -> None:
        block.to(self.home)


Rewrite = Callable[[str, Tensor], Tensor]


def unchanged(name: str, tensor: Tensor) -> Tensor:
    return tensor


class FromShards:
    """Blocks of a meta-device model read from `reader` on onload; on offload written to `writer` (when given)
    as `rewrite(name, tensor)` (a structural method slices them to its kept units) in the writer's planned dtype,
    then put back on the meta device and the freed heap returned to the OS."""

    def __init__(
        self,
        model: nn.Module,
        blocks_name: str,
        reader: ShardReader,
        writer: ShardedWriter | None,
        device: torch.device,
        dtype: torch.dtype,
        rewrite: Rewrite = unchanged,
    ):
        self.model, self.prefix = model, blocks_name + "." if blocks_name else ""
        self.reader, self.writer, self.device, self.dtype = reader, writer, device, dtype
        self.rewrite = rewrite

    def _names(self, index: int, block: nn.Module) -> list[str]:
        return [f"{self.prefix}{index}.{key}" for key in block.state_dict()]

    def onload(self, index: int, block: nn.Module) -> None:
        for name in self._names(index, block):
            tensor = self.reader.get_tensor(name)
            dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
            set_module_tensor_to_device(self.model, name, self.device, value=tensor, dtype=dtype)

    def offload(self, index: int, block: nn.Module) -> None:
        state = block.state_dict()
        for key, name in zip(state, self._names(index, block)):
            if self.writer is not None:
                self.writer.write(
                    name, self.rewrite(name, state[key]).to("cpu", self.writer.where[name].entries[name][0])
                )
            set_module_tensor_to_device(self.model, name, "meta")
        del state
        release_freed_memory()
