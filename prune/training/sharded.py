"""Sharded mask training (accelerate's FSDP2): what the trainer does differently when the masks are sharded.

Under FSDP each process holds a shard of every mask parameter and of its AdamW state, so anything that needs a
whole mask (checkpoints, best/last masks, the logged share of changed masks) first gathers it, and every
process takes part in the gather. The processes train a *sharded copy* of the caller's model that shares its
frozen tensors: FSDP turns the copy's parameters into DTensor shards, while the caller's model stays a plain
module that the main process can evaluate, save and export alone after training; the gathered masks are copied
back into it. Checkpoints hold full tensors under the same names as a one-process run, so a checkpoint resumes
under any number of processes. Methods read a mask outside the forward of its shard group through
prune.core.distributed.whole (VIB's gates, R-AMT's score norm); an objective's own parameters (VIB's Lagrange
multipliers) are not the model's and stay whole on every process.

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
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from prune.core.distributed import local_part, whole
from prune.core.errors import UserInputError

DDP_CONFIG = "recipes/accelerate/ddp.yaml"


def fsdp_requested() -> bool:
    """True under `accelerate launch` with an FSDP config (accelerate exports ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp(method: str, supported: bool, device: torch.device) -> None:
    """Refuse an FSDP launch that cannot shard: the method trains no masks (`supported` is False for one-shot
    methods; every learnable method trains sharded), or there is no accelerator (accelerate applies FSDP on
    accelerators only and would silently run each process alone)."""
    if not fsdp_requested():
        return
    if not supported:
        raise UserInputError(
            f"method {method!r} prunes in one pass and trains no masks, so an FSDP launch has nothing to shard (FSDP "
            "splits trained masks and their optimizer state over the processes); run it in one process (prune run "
            f"RECIPE) or launch it with DDP: accelerate launch --config_file {DDP_CONFIG} -m prune.cli run RECIPE."
        )
    if device.type == "cpu":
        raise UserInputError(
            "an FSDP launch needs an accelerator: on a CPU accelerate does not shard and every process would train "
            f"alone; on CPU launch with DDP instead: accelerate launch -q --config_file {DDP_CONFIG} -m prune.cli "
            "run RECIPE (CPU processes on gloo where there is no GPU, or with runtime.device: cpu)."
        )


def check_cpu_flag() -> None:
    """Refuse `accelerate launch --cpu` with a config asking for several processes: accelerate's --cpu flag takes its
    one-process launcher whatever num_processes says (it spreads CPU processes only through MPI), so the run would
    silently be one process (and never sharded). That launcher sets MASTER_ADDR for several processes but starts
    one, without WORLD_SIZE."""
    launched_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true"
    if launched_cpu and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        raise UserInputError(
            "`accelerate launch --cpu` started ONE process although its config asks for several: accelerate's --cpu "
            "flag takes its one-process launcher whatever num_processes says, so this would not be the distributed "
            f"run the config describes. Drop --cpu: accelerate launch -q --config_file {DDP_CONFIG} -m prune.cli run "
            "RECIPE starts num_processes CPU processes on gloo where there is no GPU (or with runtime.device: cpu in "
            "the recipe); fsdp.yaml needs GPUs."
        )


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def sharded_copy(model: nn.Module, objective):
    """A copy of (model, objective) for FSDP to shard: new modules and a new objective that refers to them, sharing
    every tensor with the original (no second copy of the weights; FSDP re-registers its own shards on the copy
    and leaves the original's parameters as they were). The objective's extra parameters are shared too: FSDP
    leaves those outside the model whole on every process (e.g. VIB's Lagrange multipliers, whose gradient
    every process computes alike), and a deep copy of a parameter would drop its gradient hooks and `lr_scale`."""
    tensors = [*model.parameters(), *model.buffers(), *objective.extra_parameters()]
    return copy.deepcopy((model, objective), memo={id(tensor): tensor for tensor in tensors})


def prepare_sharded(accelerator: Accelerator, model: nn.Module, optimizer):
    """accelerator.prepare under FSDP, for any model and optimizer the trainer builds:
    - an optimizer that also holds parameters outside the model (an objective's own, e.g. VIB's Lagrange
      multipliers): accelerate swaps every optimizer parameter for its model shard and fails on any other, so
      those leave their groups for the prepare and return to the same places after it (the optimizer's layout,
      and so its checkpoint, stays that of one process). They stay whole on every process, on its device;
    - frozen 0-dim parameters (CLIP's logit_scale), which FSDP2 refuses to shard: constants, they become
      buffers of the (sharded copy of the) model, whole on every process;
    - a transformers model without token embeddings (ResNet), whose get_input_embeddings() raises where
      accelerate asks for it: the copy answers None, as a model without the method does."""
    _hold_frozen_scalars(model)
    try:
        getattr(model, "get_input_embeddings", lambda: None)()
    except NotImplementedError:
        model.get_input_embeddings = lambda: None
    inside = {id(param) for param in model.parameters()}
    outside = [
        [(index, param) for index, param in enumerate(group["params"]) if id(param) not in inside]
        for group in optimizer.param_groups
    ]
    for group in optimizer.param_groups:
        group["params"] = [param for param in group["params"] if id(param) in inside]
    model, optimizer = accelerator.prepare(model, optimizer)
    for group, held in zip(optimizer.param_groups, outside):
        for index, param in held:
            param.data = param.data.to(accelerator.device)  # where FSDP put the shards (the copy starts on the CPU)
            group["params"].insert(index, param)
    return model, optimizer


def _hold_frozen_scalars(model: nn.Module) -> None:
    """Every frozen 0-dim parameter of `model` re-registered as a buffer holding the same tensor."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0 and not param.requires_grad:
                del module._parameters[name]
                module.register_buffer(name, param.detach(), persistent=False)


def model_names(params: dict[str, nn.Parameter], model: nn.Module) -> dict[str, str]:
    """Each trained parameter's name in `model`, where it is one of its parameters: a mask's under the same name, an
    objective's extra parameter that is a model weight (gating's joint backbone) under the weight's name."""
    owned = {id(param): name for name, param in model.named_parameters()}
    return {name: owned[id(param)] for name, param in params.items() if id(param) in owned}


def rebind(params: dict[str, nn.Parameter], model: nn.Module, names: dict[str, str]) -> dict[str, nn.Parameter]:
    """The same parameters looked up again in `model` by their `model_names`: FSDP replaced the model's
    parameters with DTensor shards on prepare. Parameters outside the model keep their tensor."""
    current = dict(model.named_parameters())
    return {name: current[names[name]] if name in names else param for name, param in params.items()}


def in_model_order(params: dict[str, nn.Parameter], model: nn.Module) -> list[nn.Parameter]:
    """The trained parameters in `model`'s order, those outside it last (masks alone already come in that order):
    what the trainer hands accelerate's clip_grad_norm_. Under FSDP that first compares the list with the model's
    parameter list by `==`, which answers (by identity) only when the lists agree element for element, as they do
    when every weight trains (gating's joint mode), or differ in length; in any other order comparing two tensors
    raises."""
    trained = {id(param) for param in params.values()}
    inside = [param for param in model.parameters() if id(param) in trained]
    placed = {id(param) for param in inside}
    return inside + [param for param in params.values() if id(param) not in placed]


def finish_backward(model: nn.Module) -> None:
    """Reduce the gradients of a backward that reached the sharded masks without passing back through any sharded
    module's output: FSDP2 averages (reduce-scatters) gradients at the end of a backward from hooks on module
    outputs, and a loss on values a module recorded in its forward (gating's predictor logits, when the task loss
    has no gradient) passes none, so those gradients would stay unreduced on the whole parameters and the shards
    would get none. This runs FSDP's own end-of-backward step, which reduces them (FSDP2 has no public call
    for it)."""
    if isinstance(model, FSDPModule):
        model._get_fsdp_state()._root_post_backward_final_callback()


def full(tensor: Tensor) -> Tensor:
    """The whole tensor on this process's CPU; for a DTensor shard a collective (every process must call it)."""
    return whole(tensor).detach().cpu().contiguous()


def gather(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Whole copies of `params` on every process (collective under FSDP, in the dict's order)."""
    return {name: full(param) for name, param in params.items()}


def full_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered (same layout as a one-process run)."""
    state = optimizer.state_dict()
    return {
        **state,
        "state": {
            index: {key: full(value) if isinstance(value, DTensor) else value for key, value in values.items()}
            for index, values in state["state"].items()
        },
    }


def shard_optimizer_state(state: dict, optimizer) -> dict:
    """A full optimizer state dict laid out like `optimizer`'s parameters (the inverse of full_optimizer_state)."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return {
        **state,
        "state": {
            index: {
                key: local_part(value, params[int(index)]) if torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in values.items()
            }
            for index, values in state["state"].items()
        },
    }


def copy_into(params: dict[str, nn.Parameter], tensors: dict[str, Tensor]) -> None:
    """Write whole tensors into `params` (plain parameters, or the local shards of DTensor ones)."""
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(local_part(tensors[name], param))


def local_numel(tensor: Tensor) -> int:
    """Elements this process holds (a DTensor's local shard)."""
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()
