"""Sharded mask training (accelerate's FSDP2): what the trainer does differently when the masks are sharded.

Under FSDP each process holds a shard of every mask parameter and of its AdamW state, so anything that needs a
whole mask (checkpoints, best/last masks, the logged share of changed masks) first gathers it, and every
process takes part in the gather. The processes train a *sharded copy* of the caller's model that shares its
frozen tensors: FSDP turns the copy's parameters into DTensor shards, while the caller's model stays a plain
module that the main process can evaluate, save and export alone after training; the gathered masks are copied
back into it. Checkpoints hold full tensors under the same names as a one-process run, so a checkpoint resumes
under any number of processes.

`fsdp_requested` reads what `accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets, so a run can be
refused before anything is written when its method or device cannot be sharded.
"""
from __future__ import annotations

import copy
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from prune.core.errors import UserInputError

DDP_CONFIG = "recipes/accelerate/ddp.yaml"


def fsdp_requested() -> bool:
    """True under `accelerate launch` with an FSDP config (accelerate exports ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp(method: str, supported: bool, device: torch.device) -> None:
    """Refuse an FSDP launch that cannot shard: the method's masks cannot train sharded, or there is no
    accelerator (accelerate applies FSDP on accelerators only and would silently run each process alone)."""
    if not fsdp_requested():
        return
    if not supported:
        raise UserInputError(
            f"method {method!r} is not verified to train sharded under FSDP (one-shot methods do not train; only "
            f"nm_gumbel's sharded training is checked against DDP); launch it with DDP instead: "
            f"accelerate launch --config_file {DDP_CONFIG} -m prune.cli run RECIPE."
        )
    if device.type == "cpu":
        raise UserInputError(
            "an FSDP launch needs an accelerator: on a CPU accelerate does not shard and every process would train "
            f"alone; on CPU launch with DDP instead: accelerate launch --config_file {DDP_CONFIG} --cpu "
            "-m prune.cli run RECIPE."
        )


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def sharded_copy(model: nn.Module, objective):
    """A copy of (model, objective) for FSDP to shard: new modules and a new objective that refers to them, sharing
    every tensor with the original (no second copy of the weights; FSDP re-registers its own shards on the copy
    and leaves the original's parameters as they were)."""
    shared = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy((model, objective), memo=shared)


def rebind(params: dict[str, nn.Parameter], model: nn.Module) -> dict[str, nn.Parameter]:
    """The same names, looked up again in `model`: FSDP replaced its parameters with DTensor shards on prepare.
    Names not in the model (an objective's extra parameters) keep their parameter."""
    current = dict(model.named_parameters())
    return {name: current.get(name, param) for name, param in params.items()}


def full(tensor: Tensor) -> Tensor:
    """The whole tensor on this process's CPU; for a DTensor shard a collective (every process must call it)."""
    whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return whole.detach().cpu().contiguous()


def gather(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Whole copies of `params` on every process (collective under FSDP, in the dict's order)."""
    return {name: full(param) for name, param in params.items()}


def local_part(whole: Tensor, like: Tensor) -> Tensor:
    """This process's part of `whole` laid out as `like` (a DTensor shard, or a plain tensor); no communication:
    every process holds `whole`."""
    if isinstance(like, DTensor):
        return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return whole.to(like.device)


def full_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered (same layout as a one-process run)."""
    state = optimizer.state_dict()
    return {**state, "state": {index: {key: full(value) if isinstance(value, DTensor) else value
                                       for key, value in values.items()}
                               for index, values in state["state"].items()}}


def shard_optimizer_state(state: dict, optimizer) -> dict:
    """A full optimizer state dict laid out like `optimizer`'s parameters (the inverse of full_optimizer_state)."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return {**state, "state": {index: {key: local_part(value, params[int(index)])
                                       if torch.is_tensor(value) and value.dim() > 0 else value
                                       for key, value in values.items()}
                               for index, values in state["state"].items()}}


def copy_into(params: dict[str, nn.Parameter], tensors: dict[str, Tensor]) -> None:
    """Write whole tensors into `params` (plain parameters, or the local shards of DTensor ones)."""
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(local_part(tensors[name], param))


def local_numel(tensor: Tensor) -> int:
    """Elements this process holds (a DTensor's local shard)."""
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()
