"""The one registry of pruning methods.

A method registers itself with `@register_method` in its own module; the registry imports every module in
`prune.masks` and `prune.oneshot` once, so adding a method means adding a module and touching nothing else.
A method is a validated config class plus `attach(model, config, calibration)`, which wraps the model's
targets with masks: hard masks for one-shot methods, trainable ones for learnable methods (then trained by
the one trainer).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from prune.errors import UserInputError
from prune.sparsity import Sparsity, parse_sparsity


class StrictConfig(BaseModel):
    """A config section whose unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodConfig(StrictConfig):
    """Keys every method shares. Sample YAML:

        method:
          name: wanda
          sparsity: 2:4            # N:M, or a fraction removed such as 0.5
          targets: ["*.mlp.*"]     # glob patterns over module names; default: every linear in the blocks
          skip_incompatible: false # N:M layers whose input size is not a multiple of M: error, or skip them
    """

    name: str
    sparsity: str | float = Field("2:4", description="'N:M' or a fraction of the targeted weights removed")
    targets: list[str] | None = Field(None, description="glob patterns over module names")
    skip_incompatible: bool = Field(False, description="skip layers whose input size is not divisible by M")

    @field_validator("sparsity", mode="before")
    @classmethod
    def _valid_sparsity(cls, value):
        try:
            parse_sparsity(value)
        except UserInputError as error:
            raise ValueError(str(error)) from None
        return value

    @property
    def pattern(self) -> Sparsity:
        return parse_sparsity(self.sparsity)

    def target_label(self) -> str:
        """How reports name the target (a method whose target is not an N:M/fraction sparsity overrides it)."""
        return str(self.pattern)

    @property
    def changes_weights(self) -> bool:
        """True when the method also rewrites weights, so the saved masks alone cannot rebuild the model."""
        return False


AttachFn = Callable[..., object]
SaveFn = Callable[[nn.Module, Path, MethodConfig, dict], None]
ExportFn = Callable[[nn.Module, MethodConfig], nn.Module]
RestoreFn = Callable[[nn.Module, Path, MethodConfig], nn.Module]
ReportFn = Callable[[nn.Module, MethodConfig, Tensor, dict], dict]


def save_weight_masks(model: nn.Module, directory: Path, config: MethodConfig, meta: dict) -> None:
    """The default save: hard weight masks, N:M ones as candidate indices (see prune.masks.storage)."""
    from prune.masks.storage import save_masks

    pattern = config.pattern
    save_masks(model, directory, meta, nm=(pattern.n, pattern.m) if pattern.is_nm else None)


def merge_weight_masks(model: nn.Module, config: MethodConfig) -> nn.Module:
    """The default export: hard masks baked into the weights, a plain transformers model."""
    from prune.masks.base import merge

    return merge(model)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method. `attach(model, config, calibration)` wraps the targets (a learnable method returns
    its `Objective`); `save` writes its masks into the run directory; `export` turns the masked model into
    the model saved as model/ (merged weights by default; structural methods shrink it).

    `restore(base_model, run_dir, config)` is for methods whose pruned model cannot be a plain checkpoint
    (per-input gating): the pipeline writes no model/ for them, `prune export` refuses, and
    `prune.models.load(run_dir)` rebuilds the model through it. `report(model, config, heldout_blocks,
    report)` returns report entries the method measures itself (e.g. FLOPs of per-input masks)."""

    name: str
    config_class: type[MethodConfig]
    attach: AttachFn
    kind: Literal["oneshot", "learnable"]
    needs_calibration: bool
    save: SaveFn = save_weight_masks
    export: ExportFn = merge_weight_masks
    restore: RestoreFn | None = None
    report: ReportFn | None = None


_METHODS: dict[str, MethodSpec] = {}
_DISCOVERED = False


def register_method(
    name: str,
    config_class: type[MethodConfig],
    *,
    kind: str,
    needs_calibration: bool,
    save: SaveFn = save_weight_masks,
    export: ExportFn = merge_weight_masks,
    restore: RestoreFn | None = None,
    report: ReportFn | None = None,
):
    """Decorator for a method's `attach(model, config, calibration_blocks)` function."""

    def decorate(attach: AttachFn) -> AttachFn:
        if name in _METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        _METHODS[name] = MethodSpec(name, config_class, attach, kind, needs_calibration, save, export, restore, report)
        return attach

    return decorate


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for package_name in ("prune.masks", "prune.oneshot"):
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{info.name}")


def methods() -> dict[str, MethodSpec]:
    _discover()
    return dict(_METHODS)


def get_method(name: str) -> MethodSpec:
    available = methods()
    if name not in available:
        raise UserInputError(f"unknown method {name!r}; available methods: {', '.join(sorted(available))}.")
    return available[name]

