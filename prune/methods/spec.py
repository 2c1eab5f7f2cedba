"""What a method is: its declaration (prune.methods.declaration: name, config class, kind, tasks), an `attach`
function and its save/load/export/restore hooks.

`attach(model, config, calibration)` wraps the model's targets with masks: hard masks for one-shot methods,
trainable ones for learnable methods (which then train with the one trainer). The hooks default to weight
masks (saved as masks.safetensors, loaded back as hard masks, merged into the weights on export).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from prune.calibration.layerwise import LayerPruner, MakeStats
from prune.core.config import MethodConfig
from prune.masks.base import merge
from prune.masks.storage import load_masks, save_masks
from prune.methods.declaration import MethodDeclaration

AttachFn = Callable[..., object]
SaveFn = Callable[[nn.Module, Path, MethodConfig, dict], None]
ExportFn = Callable[[nn.Module, MethodConfig], nn.Module]
LoadFn = Callable[[nn.Module, Path, MethodConfig], nn.Module]


@dataclass(frozen=True)
class HeldOut:
    """Held-out inputs a method's `report` hook measures on, whatever the task (prune.tasks hands them over):
    `samples` stacked, one sample per forward `model(samples[i:i + 1])` (token windows of a causal LM, images
    of a classifier); each holds `per_sample` of the per-input `unit` a method may count in (tokens in a
    window, 1 for an image); `name` is what a sample is called in the report (windows, images); `flops(model)`
    is the task's dense FLOPs count of one sample's forward."""

    samples: Tensor
    name: str
    unit: str
    per_sample: int
    flops: Callable[[nn.Module], int]


ReportFn = Callable[[nn.Module, MethodConfig, HeldOut, dict], dict]
TargetsFn = Callable[[nn.Module, MethodConfig], list[str]]


@dataclass(frozen=True)
class BlockPruning:
    """How a method prunes its targets one decoder block at a time from that block's calibration statistics
    (prune.calibration.layerwise): `make_stats(module)` accumulates a target's inputs (None: the method reads no
    data), `prune(name, module, stats)` returns its keep-mask and re-fit weight (or None) without modifying it.
    What a model that is never whole in memory (runtime.offload: disk) is pruned with."""

    make_stats: MakeStats | None
    prune: LayerPruner


BlockPruningFn = Callable[[MethodConfig], BlockPruning]


@dataclass(frozen=True)
class StreamedExport:
    """How a structural method prunes a model that is never whole in memory (runtime.offload: disk) straight into
    the physically smaller checkpoint its `export` writes: `check(skeleton, config)` refuses, before anything is
    written, what cannot stream (e.g. a smaller model that plain transformers cannot describe); `write(checkpoint,
    output, config, calibration, device, dtype)` writes it shard by shard, one block in memory at a time, and
    returns the structural figures its `report` reads (prune.structural.store.summary)."""

    check: Callable[[nn.Module, MethodConfig], None]
    write: Callable[[Path, Path, MethodConfig, Tensor | None, torch.device, torch.dtype], dict]


def masks_meta(model: str, config: MethodConfig, *, recovered: bool = False) -> dict:
    """The run metadata saved beside the masks (masks.json, gating.json): the model they were made for, the method
    and its config, and whether the weights changed -- the method rewrote them, or recovery (`recovered`) trained
    the kept ones -- so that the masks alone cannot rebuild the pruned model. One builder for `prune run`, a
    sweep's points and `prune.save_masks`."""
    return {
        "model": model,
        "method": config.name,
        "config": config.model_dump(mode="json"),
        "weights_changed": config.changes_weights or recovered,
    }


def save_weight_masks(model: nn.Module, directory: Path, config: MethodConfig, meta: dict) -> None:
    """The default save: hard weight masks, N:M ones as candidate indices (see prune.masks.storage)."""
    pattern = config.pattern
    save_masks(model, directory, meta, nm=(pattern.n, pattern.m) if pattern.is_nm else None)


def load_weight_masks(model: nn.Module, directory: Path, config: MethodConfig) -> nn.Module:
    """The default load: the saved hard masks wrapped around the base model's targets (names, shapes checked)."""
    load_masks(model, directory)
    return model


def merge_weight_masks(model: nn.Module, config: MethodConfig) -> nn.Module:
    """The default export: hard masks baked into the weights (in place: the masked model is not used again), a
    plain transformers model."""
    return merge(model, in_place=True)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: `declared` (its name, config class, kind and tasks, which the recipe reads without
    torch) and what it does to a model. `attach(model, config, calibration)` wraps the targets (a learnable
    method returns its `Objective`); `save` writes its masks into the run directory; `load(base_model,
    directory, config)` puts saved masks back on the model they were made for (as fixed masks, in evaluation
    form); `export` turns the masked model into the model saved as model/ (merged weights by default;
    structural methods shrink it).

    `restore(base_model, run_dir, config)` is for methods whose pruned model cannot be a plain checkpoint
    (per-input gating): the pipeline writes no model/ for them, `prune export` refuses, and
    `prune.load_model(run_dir)` rebuilds the model through it. `report(model, config, heldout, report)`
    returns report entries the method measures itself (e.g. FLOPs of per-input masks) on `HeldOut` inputs.
    `fsdp`: its masks train sharded under an FSDP launch (every learnable method: tests/test_fsdp.py checks each
    against one process); one-shot methods train nothing to shard and are refused.
    `block_pruning(config)`: how the method prunes one decoder block at a time from that block's calibration
    statistics (see BlockPruning); a method that has it runs under `runtime.offload` (cpu: blocks onloaded to the
    device in turn; disk: streamed from shards, the task pruning through this hook). A structural method instead
    has `streamed_export` (see StreamedExport); either way its `attach` takes `placement=` (the blocks' placement
    under offload: cpu, prune.calibration.placement) and reads each block's data with that block on the device.

    `needs_selection`: `attach` also takes `selection=`, validation windows it chooses on (depth's removal set), so
    no choice reads the test part.

    `targets(model, config)` names the modules the method masks from the model's structure alone (no
    forward): the pipeline calls it before the first forward, so a pattern that cannot fit the layers (N:M
    groups that do not tile them, a glob that matches nothing) fails at once, and `prune export` compares it
    with the saved masks.

    `check(model, config)`: what else the method refuses before the run directory is claimed, from the model's
    structure and its config (e.g. a prior taken from another run: that run's masks must exist and fit).

    `trained_per_weight(config)`: how many float32 values a learnable method trains per targeted weight (one logit
    per keep-pattern of a group for N:M candidates), which the memory preflight (prune.runs.preflight) turns into
    parameters, gradients and AdamW moments; None where what trains is per unit (gates, predictors), negligible
    next to the weights."""

    declared: MethodDeclaration
    attach: AttachFn
    needs_calibration: bool
    needs_selection: bool = False
    save: SaveFn = save_weight_masks
    load: LoadFn = load_weight_masks
    export: ExportFn = merge_weight_masks
    restore: LoadFn | None = None
    report: ReportFn | None = None
    fsdp: bool = False
    block_pruning: BlockPruningFn | None = None
    streamed_export: StreamedExport | None = None
    targets: TargetsFn | None = None
    check: Callable[[nn.Module, MethodConfig], None] | None = None
    trained_per_weight: Callable[[MethodConfig], float] | None = None

    @property
    def name(self) -> str:
        return self.declared.name

    @property
    def config_class(self) -> type[MethodConfig]:
        return self.declared.config_class

    @property
    def kind(self) -> str:
        return self.declared.kind

    @property
    def tasks(self) -> frozenset[str]:
        return self.declared.tasks

    @property
    def block_by_block(self) -> bool:
        """The method prunes block by block, so it runs under runtime.offload."""
        return self.block_pruning is not None or self.streamed_export is not None
