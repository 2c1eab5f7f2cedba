"""What every mask answers, and the wrapper that applies a mask to a module without touching its weights.

A `Mask` is a small module that owns its trainable parameters (none for a hard mask) and answers: its value
now (`forward`: soft while training, hard in eval mode), its hard value, and its regularizer. A
`MaskWrapper` replaces a target module in the model; the original module lives on, frozen and unmodified, as
`wrapper.base`, so `unwrap` gives back the exact original and `merge` bakes the hard mask into a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from prune.core.errors import UserInputError
from prune.models.blocks import weight_matrix


class Mask(nn.Module):
    """A mask over one [out, in] weight matrix."""

    def hard(self) -> Tensor:
        """The bool mask used at evaluation and export (True = keep)."""
        raise NotImplementedError

    def soft(self) -> Tensor:
        """The differentiable value used in training; a fixed mask is its own soft value."""
        return self.hard().float()

    def regularizer(self, weight: Tensor) -> Tensor:
        """A term the trainer adds to the loss (zero unless the method defines one)."""
        return weight.new_zeros(())

    def forward(self) -> Tensor:
        return self.soft() if self.training else self.hard()


class Objective:
    """What a training stage adds to the trainer: what trains, schedules and a regularizer. A learnable method's
    `attach` returns one for mask training; recovery (prune.recovery) has its own, which trains kept weights.

    The trainer computes the task loss itself, adds `regularizer(model)`, and optimizes `trainable(model)` and
    nothing else: by default the masks' parameters plus `extra_parameters()` (e.g. Lagrange multipliers that the
    method trains by ascent).

    A method that needs gradient surgery (several gradients combined per parameter, e.g. R-AMT's gradient
    dropout) sets `backward` to a callable `backward(model, batch, task_loss, accelerator, scale)` that
    computes the gradients itself, ADDS `scale` times them to each trainable parameter's `.grad` (as
    `loss.backward()` would), and returns (task loss, regularizer) for the log. The trainer then calls it
    instead of its own forward/backward. None: the plain task loss + regularizer backward.
    """

    backward: Callable[..., tuple[Tensor, Tensor]] | None = None
    label = "train masks"  # what the trainer's progress bar calls the stage

    def trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """What the trainer optimizes, by name (everything else stays frozen): each mask's own parameters under
        `<wrapper>.mask.<name>`, then `extra_parameters()` under `objective.<index>`. Names are looked up in
        `model` each call, so the answer holds for the copy a sharded (FSDP) run trains."""
        params = {
            f"{wrapper_name}.mask.{name}": param
            for wrapper_name, wrapper in wrappers(model).items()
            for name, param in wrapper.mask.named_parameters()
        }
        params.update({f"objective.{index}": param for index, param in enumerate(self.extra_parameters())})
        return params

    def begin_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Set schedule values (temperatures, progress) on the masks; return them for the log."""
        return {}

    def regularizer(self, model: nn.Module) -> Tensor:
        return torch.zeros(())

    def extra_parameters(self) -> list[nn.Parameter]:
        return []

    def selectable(self) -> bool:
        """May the current hard masks be kept as the run's best? False while they miss the method's budget
        (a size target still warming up), so a periodic evaluation never picks an under-pruned model."""
        return True


class HardMask(Mask):
    """A fixed bool mask, as produced by one-shot methods or loaded from masks.safetensors."""

    def __init__(self, keep: Tensor):
        super().__init__()
        self.register_buffer("keep", keep.to(torch.bool), persistent=False)

    def hard(self) -> Tensor:
        return self.keep


class MaskWrapper(nn.Module):
    """Replaces a target module; `base` stays frozen and bit-identical.

    `masks_inputs`: the mask zeroes what enters `base` (activation sparsity's thresholds), never its weights or
    outputs, so `base`'s weights can train with the wrapper in the forward (recovery training does)."""

    masks_inputs: ClassVar[bool] = False

    def __init__(self, base: nn.Module, mask: Mask):
        super().__init__()
        self.base = base
        self.mask = mask
        base.requires_grad_(False)

    def merged(self) -> nn.Module:
        """A plain copy of `base` with the hard mask applied, for export."""
        raise NotImplementedError

    def baked(self) -> nn.Module:
        """`base` itself with the hard mask applied to its own weights, for an export after which this wrapper is
        never used again; wrappers that cannot do it in place give `merged()`."""
        return self.merged()


class WeightMasked(MaskWrapper):
    """W_eff = W ⊙ M for nn.Linear and GPT-2's Conv1D (mask always in [out, in] orientation)."""

    def __init__(self, base: nn.Module, mask: Mask):
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"WeightMasked wraps nn.Linear or Conv1D, got {type(base).__name__}")
        super().__init__(base, mask)

    def effective_weight(self) -> Tensor:
        weight = weight_matrix(self.base)
        return weight * self.mask().to(weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.base.bias)

    def merged(self) -> nn.Module:
        return _mask_weight(copy.deepcopy(self.base), self.mask.hard())

    def baked(self) -> nn.Module:
        return _mask_weight(self.base, self.mask.hard())


class ConvWeightMasked(MaskWrapper):
    """W_eff = W ⊙ M for nn.Conv2d (e.g. a ViT's patch embedding); the mask has the weight's 4-D shape."""

    def __init__(self, base: nn.Module, mask: Mask):
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"ConvWeightMasked wraps nn.Conv2d, got {type(base).__name__}")
        super().__init__(base, mask)

    @property
    def weight(self) -> Tensor:
        """The frozen weight: model code reads `patch_embedding.weight.dtype` (CLIP), so it must resolve here."""
        return self.base.weight

    def effective_weight(self) -> Tensor:
        return self.base.weight * self.mask().to(self.base.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.base._conv_forward(x, self.effective_weight(), self.base.bias)

    def merged(self) -> nn.Module:
        return _mask_weight(copy.deepcopy(self.base), self.mask.hard())

    def baked(self) -> nn.Module:
        return _mask_weight(self.base, self.mask.hard())


def _mask_weight(module: nn.Module, keep: Tensor) -> nn.Module:
    """Multiply `module`'s weight by the bool mask `keep` in place (a Conv1D's [in, out] weight by its transpose)."""
    with torch.no_grad():
        module.weight.mul_(keep.t() if isinstance(module, Conv1D) else keep)
    return module


def weight_masked(base: nn.Module, mask: Mask) -> MaskWrapper:
    """The weight-mask wrapper that fits `base`: convolutions get ConvWeightMasked, linears WeightMasked."""
    return ConvWeightMasked(base, mask) if isinstance(base, nn.Conv2d) else WeightMasked(base, mask)


def wrappers(model: nn.Module) -> dict[str, MaskWrapper]:
    """Every mask wrapper in the model, by the name of the module it replaced."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MaskWrapper)}


def wrap(model: nn.Module, wrapped: dict[str, MaskWrapper]) -> None:
    for name, wrapper in wrapped.items():
        model.set_submodule(name, wrapper)


def unwrap(model: nn.Module) -> nn.Module:
    """Put the original modules back (weights exactly as before wrapping), innermost wrappers first: a
    wrapper may sit inside another one's `base` (a gated projection inside a gated decoder layer), and its
    name only resolves while the outer wrapper is still in place."""
    for name, wrapper in reversed(list(wrappers(model).items())):
        model.set_submodule(name, wrapper.base)
    return model


@contextmanager
def unwrapped(model: nn.Module) -> Iterator[nn.Module]:
    """The model with each wrapper's base in its place for the block (to save the base weights as a plain
    checkpoint), the wrappers put back after, also on error."""
    placed = wrappers(model)
    unwrap(model)
    try:
        yield model
    finally:
        wrap(model, placed)


def merge(model: nn.Module, *, in_place: bool = False) -> nn.Module:
    """Replace every wrapper by its base with the hard mask baked in: a plain transformers model. The bases stay
    untouched (a sweep puts them back after measuring the merged copies); `in_place` masks each base's own weights
    instead (`MaskWrapper.baked`), for an export after which the masked model is never used: a copy of every target
    would add their size to the process's memory for good, since weights memory-mapped from a checkpoint stay
    mapped when their module is dropped."""
    for name, wrapper in wrappers(model).items():
        model.set_submodule(name, wrapper.baked() if in_place else wrapper.merged())
    return model


def hard_masks(model: nn.Module) -> dict[str, Tensor]:
    return {name: wrapper.mask.hard() for name, wrapper in wrappers(model).items()}


def weight_masks(model: nn.Module) -> dict[str, Tensor]:
    """The hard masks of the wrappers that mask a weight (W ⊙ M: linears and convolutions), by module name;
    structural gates and per-input predictors, which mask outputs, are not among them."""
    return {
        name: wrapper.mask.hard()
        for name, wrapper in wrappers(model).items()
        if isinstance(wrapper, (WeightMasked, ConvWeightMasked))
    }


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every mask: the only thing a trainer may optimize."""
    return [param for wrapper in wrappers(model).values() for param in wrapper.mask.parameters()]


def attach_hard_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Wrap each named linear (or convolution) with a fixed mask (one-shot results, loaded masks)."""
    modules = dict(model.named_modules())
    wrap(model, {name: weight_masked(modules[name], HardMask(keep)) for name, keep in masks.items()})


def masked_fractions(model: nn.Module) -> dict[str, float]:
    """Share of the targeted weights that the hard masks remove, and the same count over all the model's
    parameters (mask parameters themselves excluded; tied weights counted once)."""
    masks = hard_masks(model).values()
    targeted = sum(keep.numel() for keep in masks)
    removed = targeted - sum(int(keep.count_nonzero()) for keep in masks)  # a bool sum() copies to int64
    own = {id(param) for param in mask_parameters(model)}
    total = sum(param.numel() for param in {id(p): p for p in model.parameters() if id(p) not in own}.values())
    return {"targeted": removed / targeted if targeted else 0.0, "all": removed / total if total else 0.0}


def achieved_sparsity(model: nn.Module) -> float:
    """The share of targeted weights that the hard masks remove."""
    return masked_fractions(model)["targeted"]


class MaskedSaveGuard:
    """Stands in for a masked model's `save_pretrained` (see `guard_save`): refuses while the model holds mask
    wrappers, and is the model's own `save_pretrained` once none are left."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        masked = list(wrappers(self.model))
        if masked:
            raise UserInputError(
                f"MaskPrune's masks are still attached to {len(masked)} of this model's modules (e.g. {masked[0]}); "
                "save_pretrained would write their frozen weights under '<name>.base.weight' keys, which "
                "from_pretrained silently re-initialises at random. Merge them first: `prune.export(model)` makes "
                "the model the plain pruned one (in place), which saves and reloads with plain transformers; "
                "`prune.save_masks(model, directory)` keeps the masks (and weights `prune.recover` trained under input "
                "masks)."
            )
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


def guard_save(model: nn.Module) -> None:
    """Make `model.save_pretrained` (and what calls it, e.g. push_to_hub) refuse while masks are attached, instead
    of writing a checkpoint that loads as silently corrupted. An instance attribute: the class is left alone, and
    a deep copy of the model carries a guard of its own."""
    if hasattr(type(model), "save_pretrained") and not isinstance(vars(model).get("save_pretrained"), MaskedSaveGuard):
        model.save_pretrained = MaskedSaveGuard(model)


def release_save(model: nn.Module) -> None:
    """Give `model` its class's `save_pretrained` back (after its masks were merged)."""
    if isinstance(vars(model).get("save_pretrained"), MaskedSaveGuard):
        del model.save_pretrained


@contextmanager
def bypassing(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Set `bypass` on each layer for the block (a per-input mask that then computes densely), and clear it after,
    also on error: the dynamic methods' way to run their own dense model, e.g. to time or count it."""
    layers = list(layers)
    for layer in layers:
        layer.bypass = True
    try:
        yield
    finally:
        for layer in layers:
            layer.bypass = False
