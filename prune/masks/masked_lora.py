"""LoRA adapters (peft) whose update keeps a weight mask: a masked layer merges to W + (s · B A) ⊙ M, so a pruned
weight stays exactly zero through training and merging, and a 2:4 layer stays exactly 2:4.

Why not plain LoRA on a sparse model: B A is dense, and merging it would fill every pruned weight. The update is
masked where it acts instead: the layer computes W x + ((s · B A) ⊙ M) x, and merging adds the same masked
product, so the gradient reaches A and B through the mask and they learn only what the kept weights can hold.
The price is one [out, in] product per forward (B A, then the masked matmul), about a dense layer's compute,
where plain LoRA costs r (in + out) per token.

The masked update is peft's own extension point, a LoraVariant (the mechanism DoRA uses), installed on each peft
LoRA layer whose weight is masked; the mask is a buffer of that layer (`keep`, [out, in], True = kept), so it
moves with the model. A layer without a mask (every layer of a structurally shrunk model) gets plain LoRA.
`add_lora` injects the adapters in place (peft's inject_adapter_in_model: no PeftModel wrapper, module names stay
the model's); `merge_lora` folds each adapter into its base weight and puts the plain layer back.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.tuners.tuners_utils import cast_adapter_dtype
from peft.utils.other import transpose
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from prune.core.errors import UserInputError

ADAPTER = "default"  # peft's name for the one adapter


def masked_delta(layer: LoraLayer, adapter: str) -> Tensor:
    """(s · B A) ⊙ M in [out, in] orientation: exactly zero where the mask removed the weight."""
    product = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
    return torch.where(layer.keep, product * layer.scaling[adapter], 0.0)


def _stored_delta(layer: LoraLayer, adapter: str, like: Tensor) -> Tensor:
    """The masked update in the base weight's own orientation and dtype (GPT-2's Conv1D stores [in, out])."""
    return transpose(masked_delta(layer, adapter), layer.fan_in_fan_out).to(like.dtype)


class MaskedLoRA(LoraVariant):
    """peft's LoRA with the update masked in the forward and at merge (see the module doc)."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs) -> None:
        """Nothing to create: `add_lora` registers the mask on the layer."""

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return orig_weight + _stored_delta(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> None:
        orig_weight.data += _stored_delta(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return orig_weight - _stored_delta(module, active_adapter, orig_weight)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: Tensor, result: Tensor, **kwargs) -> Tensor:
        dropped = module.lora_dropout[active_adapter](x)
        return result + F.linear(dropped, masked_delta(module, active_adapter).to(dropped.dtype))


def fan_in_fan_out(model: nn.Module, targets: list[str]) -> bool:
    """peft's `fan_in_fan_out` for these targets: True for GPT-2's Conv1D layers (weights stored [in, out]). One
    adapter config has one orientation, so targets mixing them with nn.Linear layers are refused."""
    modules = dict(model.named_modules())
    conv1d = {isinstance(modules[name], Conv1D) for name in targets}
    if len(conv1d) > 1:
        raise UserInputError(
            "recover.targets mix Conv1D layers (GPT-2's) and nn.Linear layers, which LoRA adapts in opposite "
            "orientations; target one kind (e.g. only the decoder blocks' layers)."
        )
    return conv1d == {True}


def add_lora(model: nn.Module, targets: list[str], masks: dict[str, Tensor], rank: int, alpha: float) -> list[str]:
    """Inject LoRA adapters (rank, alpha: peft's r and lora_alpha) into the `targets` (Linear or Conv1D module
    names), in place; a target with an entry in `masks` ([out, in] bool) gets the masked update. The adapter's
    weights are float32 whatever the model's dtype (as peft's get_peft_model makes them). Returns the names of
    the adapter's parameters: what trains."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), fan_in_fan_out=fan_in_fan_out(model, targets)
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, keep in masks.items():
        if name in targets:
            layer = model.get_submodule(name)
            layer.register_buffer("keep", keep.to(layer.lora_A[ADAPTER].weight.device), persistent=False)
            layer.lora_variant[ADAPTER] = MaskedLoRA()
    cast_adapter_dtype(model, ADAPTER)
    return [
        name for name, _ in model.named_parameters() if f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name
    ]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight (the masked update where the layer has a mask; peft's safe
    merge, which refuses a non-finite result) and put the plain base layer back in its place."""
    for name, layer in [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]:
        layer.merge(safe_merge=True)
        model.set_submodule(name, layer.get_base_layer())
    if "peft_config" in vars(model):  # peft's injection leaves its config on the model
        del model.peft_config
    return model
