"""Masks and a peft adapter (LoRA) on the same model: train masks only, the adapter only, or both; save and
load both.

How they nest: create the peft model first, then attach the masks. peft replaces a targeted `q_proj` by a LoRA
layer whose frozen `base_layer` is the original nn.Linear; the mask then wraps that `base_layer`, so the layer
computes (W ⊙ M) x + B A x: the mask prunes the frozen weight and the adapter adds its low-rank update. (The
other order fails: peft does not recognize a mask wrapper as a layer it can adapt.)

Names: masks are saved under the names of the plain model (`vision_model...q_proj`, without peft's
`base_model.model.` prefix and `.base_layer` suffix), so one masks.safetensors loads into the plain model and
into a peft model alike. Saving writes peft's own adapter files (adapter_config.json,
adapter_model.safetensors) beside masks.safetensors + masks.json.

    from peft import LoraConfig, PeftModel, get_peft_model
    model = get_peft_model(clip, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    objective = attach_binary(model, BinaryConfig())          # masks after the adapter
    params = set_trainable(model, masks=True, adapter=True)   # or masks only / adapter only
    ...train...
    save_with_adapter(model, "out/")
    restored = load_with_adapter(CLIPModel.from_pretrained(...), "out/")   # identical logits
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from prune.core.errors import UserInputError
from prune.masks.base import HardMask, hard_masks, mask_parameters, weight_masked, wrap
from prune.masks.storage import read_masks, write_masks
from prune.models.blocks import weight_matrix

PEFT_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer"


def canonical_name(name: str) -> str:
    """The module's name in the plain model: peft's wrapper prefix and LoRA's `.base_layer` dropped."""
    name = name.removeprefix(PEFT_PREFIX)
    return name.removesuffix(BASE_LAYER)


def locate(model: nn.Module, canonical: str) -> str | None:
    """The name under which `canonical` lives in `model` (plain or peft), pointing at the frozen base layer."""
    modules = dict(model.named_modules())
    for name in (canonical, PEFT_PREFIX + canonical):
        if name in modules:
            return f"{name}{BASE_LAYER}" if f"{name}{BASE_LAYER}" in modules else name
    return None


def load_masks_into(model: nn.Module, directory: str | Path) -> dict:
    """Wrap `model`'s targets (plain or peft) with the hard masks saved in `directory`, after checking every
    name and shape; returns masks.json's content. With a peft model, load the adapter first."""
    masks, meta = read_masks(directory)
    modules = dict(model.named_modules())
    located, problems = {}, []
    for canonical, keep in masks.items():
        name = locate(model, canonical)
        if name is None:
            problems.append(f"{canonical} (no such module)")
        elif tuple(weight_matrix(modules[name]).shape) != tuple(keep.shape):
            problems.append(
                f"{canonical} (mask {tuple(keep.shape)}, weight {tuple(weight_matrix(modules[name]).shape)})"
            )
        else:
            located[name] = keep
    if problems:
        raise UserInputError(
            f"masks in {directory} do not fit this model ({meta.get('model', '?')} was tuned): "
            f"{', '.join(problems[:5])}. Load them into the model they were made for."
        )
    wrap(model, {name: weight_masked(modules[name], HardMask(keep)) for name, keep in located.items()})
    return meta


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA adapter's own weights (peft names them lora_A / lora_B / lora_embedding_*)."""
    return [
        param for name, param in model.named_parameters() if any(part.startswith("lora_") for part in name.split("."))
    ]


def set_trainable(model: nn.Module, *, masks: bool, adapter: bool) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the mask scores and/or the adapter; returns what trains (for the
    optimizer). Base weights never train."""
    model.requires_grad_(False)
    chosen = (mask_parameters(model) if masks else []) + (adapter_parameters(model) if adapter else [])
    if not chosen:
        what = " and ".join(kind for kind, wanted in (("masks", masks), ("adapter", adapter)) if wanted) or "nothing"
        raise UserInputError(f"asked to train {what}, but the model has no such parameters; attach them first.")
    for param in chosen:
        param.requires_grad_(True)
    return chosen


def save_with_adapter(model: nn.Module, directory: str | Path, meta: dict | None = None) -> None:
    """peft's adapter files (when `model` is a peft model) plus masks.safetensors/masks.json, in one directory."""
    directory = Path(directory)
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory)  # peft saves only the adapter's weights (names with lora_), not the masks
    masks = {canonical_name(name): keep for name, keep in hard_masks(model).items()}
    write_masks(masks, directory, {"method": "binary", **(meta or {})})


def load_with_adapter(base_model: nn.Module, directory: str | Path) -> nn.Module:
    """The inverse of `save_with_adapter`: peft's adapter onto `base_model` (when one was saved), then the masks."""
    directory = Path(directory)
    model = base_model
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_model, directory)
    load_masks_into(model, directory)
    return model.eval()
