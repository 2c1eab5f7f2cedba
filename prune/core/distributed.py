"""Tensors that may be FSDP2 shards (DTensor): their whole value, and one process's part of a whole value.

Under FSDP a mask parameter is a whole tensor only inside the forward of its shard group; anywhere else (a
regularizer computed after the forward, a budget read before it, a gate that other groups' modules apply) it
is this process's shard. Code that needs the whole value asks for it here, and the same code then runs
unchanged with one process (plain tensors pass through).
"""

from __future__ import annotations

from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor


def whole(tensor: Tensor) -> Tensor:
    """The whole value of `tensor`: a plain tensor as it is; a DTensor gathered (a collective: every process must
    ask, in the same order). Differentiable. A shard's gradient is averaged over the processes, as FSDP averages
    the task gradient, so a value each process uses on its own batch and a value every process uses alike (a
    regularizer) both train as with one process; a partial sum (e.g. of squares over a shard) passes the same
    gradient to every process's part, which is right for a loss every process computes alike."""
    if not isinstance(tensor, DTensor):
        return tensor
    grads = [Partial("avg") if placement.is_shard() else Replicate() for placement in tensor.placements]
    return tensor.full_tensor(grad_placements=grads)


def local_part(full: Tensor, like: Tensor) -> Tensor:
    """This process's part of `full` laid out as `like` (a DTensor shard, or a plain tensor); no communication:
    every process holds `full`."""
    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return full.to(like.device)
