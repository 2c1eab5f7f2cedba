"""One-shot methods, registered: model + targets in, masks (and SparseGPT's updated weights) out, the model's
weights left exactly as they were at entry.

Each method is ONE per-target rule (`magnitude_rule`, `wanda_rule`, `sparsegpt_rule`: a target's keep-mask, and
SparseGPT's re-fit weight, from its weight and the calibration statistics its declaration names), held by its
MethodSpec's `block_pruning` hook. Every path prunes through that hook: `attach` and the functions `magnitude`,
`wanda`, `sparsegpt` drive it with the layer-by-layer driver `prune.calibration.layerwise.prune_layerwise`
(sequential: block k+1 is calibrated on the pruned block k; the original weights restored at the end), a model
streamed from disk with `prune.calibration.streaming`, and a sweep's shared statistics with `prune_from_stats`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prune.calibration.input_norms import WandaStats
from prune.calibration.layerwise import BlockPlacement, prune_layerwise
from prune.core.config import MethodConfig
from prune.core.sparsity import Sparsity
from prune.masks.base import attach_hard_masks
from prune.masks.targets import method_targets
from prune.methods.declaration import MethodDeclaration
from prune.methods.oneshot import config as declared
from prune.methods.oneshot.config import MagnitudeConfig, SparseGPTConfig, WandaConfig
from prune.methods.oneshot.magnitude import magnitude_scores
from prune.methods.oneshot.masking import mask_from_scores
from prune.methods.oneshot.sparsegpt import HessianStats, sparsegpt_prune
from prune.methods.oneshot.wanda import wanda_scores
from prune.methods.registry import get_method
from prune.methods.spec import BlockPruning, BlockPruningFn, MethodSpec
from prune.models.blocks import in_out_features, weight_matrix

# config, the target's [out, in] weight, its statistics (None when the method reads none) ->
# (keep-mask [out, in], re-fit weight or None); the weight is not modified
TargetRule = Callable[[Any, Tensor, Any], "tuple[Tensor, Tensor | None]"]
# what accumulates each kind of statistics a declaration names (prune.methods.declaration: `statistics`)
ACCUMULATORS = {"norms": WandaStats, "hessian": HessianStats}


@dataclass
class OneShotResult:
    masks: dict[str, Tensor] = field(default_factory=dict)  # name -> bool [out, in] (CPU), True = keep
    weights: dict[str, Tensor] = field(default_factory=dict)  # name -> updated [out, in] (SparseGPT only)


def magnitude_rule(config: MagnitudeConfig, weight: Tensor, stats: None) -> tuple[Tensor, None]:
    """Keep the largest |W|; reads no data."""
    return mask_from_scores(magnitude_scores(weight), config.pattern, config.granularity), None


def wanda_rule(config: WandaConfig, weight: Tensor, stats) -> tuple[Tensor, None]:
    """Keep the largest |W_ij| * ||X_j||; `stats` answers `input_sq_norm()`."""
    scores = wanda_scores(weight, stats.input_sq_norm())
    return mask_from_scores(scores, config.pattern, config.granularity), None


def sparsegpt_rule(config: SparseGPTConfig, weight: Tensor, stats) -> tuple[Tensor, Tensor | None]:
    """OBS mask selection from the Hessian (`stats` answers `matrix()`); the re-fit weight with update_weights."""
    new_weight, mask = sparsegpt_prune(
        weight,
        stats.matrix(),
        config.pattern,
        blocksize=config.blocksize,
        dampening=config.dampening,
        update_weights=config.update_weights,
    )
    return mask, (new_weight if config.update_weights else None)


def block_pruning_of(method: MethodDeclaration, rule: TargetRule) -> BlockPruningFn:
    """The MethodSpec hook: for a config, the accumulator of the statistics the declaration names (None: none)
    and the per-target pruning by `rule`."""
    accumulator = ACCUMULATORS.get(method.statistics)

    def for_config(config: MethodConfig) -> BlockPruning:
        make_stats = None if accumulator is None else lambda module: accumulator(in_out_features(module)[0])
        return BlockPruning(make_stats, lambda name, module, stats: rule(config, weight_matrix(module), stats))

    return for_config


def _targets(model: nn.Module, config: MethodConfig) -> list[str]:
    return method_targets(model, config.targets, config.pattern, config.skip_incompatible)


def targets_of(config: MethodConfig):
    """`model -> target names` for this config (the streamed driver asks once it has built the skeleton)."""
    return lambda model: _targets(model, config)


def prune_sequentially(
    pruning: BlockPruning,
    model: nn.Module,
    target_names: list[str],
    calib_blocks: Tensor | None,
    *,
    batch_size: int = 1,
    progress: bool = True,
    placement: BlockPlacement | None = None,
    in_place: bool = False,
) -> OneShotResult:
    """Prune `target_names` block by block with a method's hook (see prune_layerwise); the model is restored, or
    with `in_place` keeps the pruned (and re-fit) weights, and only the masks come back (no copy of the targets)."""
    result = prune_layerwise(
        model,
        target_names,
        pruning.prune,
        pruning.make_stats,
        calib_blocks if pruning.make_stats is not None else None,
        batch_size=batch_size,
        progress=progress,
        placement=placement,
        restore=not in_place,
    )
    return OneShotResult(result.masks, result.weights)


def prune_from_stats(config: MethodConfig, module: nn.Module, stats) -> tuple[Tensor, Tensor | None]:
    """One target's keep-mask (and re-fit weight, else None) from statistics gathered beforehand, without any
    calibration forward, by the method's own rule: `stats` answers what its declaration's `statistics` names
    (`input_sq_norm()`, `matrix()`; None for none). The module is not modified."""
    return get_method(config.name).block_pruning(config).prune("", module, stats)


def _attach(model: nn.Module, result: OneShotResult) -> None:
    """Write any updated weights into the model (none when pruned in place), then wrap each target with its fixed
    mask."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in result.weights.items():
            weight_matrix(modules[name]).copy_(weight)
    attach_hard_masks(model, result.masks)


def one_shot_spec(method: MethodDeclaration, rule: TargetRule) -> MethodSpec:
    """A one-shot method's MethodSpec from its declaration and its rule: `attach` prunes the config's targets
    sequentially through the same `block_pruning` hook a streamed model and a sweep prune through; a config that
    re-fits weights (SparseGPT's update) prunes in place: the re-fit weights are the model's from then on, and a
    restored original beside a copy of every re-fit weight would hold the targets twice."""
    block_pruning = block_pruning_of(method, rule)

    def attach(
        model: nn.Module, config: MethodConfig, calibration: Tensor | None, placement: BlockPlacement | None = None
    ) -> None:
        pruning = block_pruning(config)
        targets = _targets(model, config)
        in_place = config.changes_weights
        _attach(model, prune_sequentially(pruning, model, targets, calibration, placement=placement, in_place=in_place))

    return MethodSpec(
        method,
        attach,
        needs_calibration=method.statistics != "none",
        block_pruning=block_pruning,
        targets=_targets,
    )


MAGNITUDE = one_shot_spec(declared.MAGNITUDE, magnitude_rule)
WANDA = one_shot_spec(declared.WANDA, wanda_rule)
SPARSEGPT = one_shot_spec(declared.SPARSEGPT, sparsegpt_rule)
attach_magnitude, attach_wanda, attach_sparsegpt = MAGNITUDE.attach, WANDA.attach, SPARSEGPT.attach


def _recipe_sparsity(sparsity: Sparsity) -> str | float:
    """A Sparsity as a config's `sparsity` value that parses back to it exactly ('2:4', or the fraction itself)."""
    return str(sparsity) if sparsity.is_nm else sparsity.fraction


def magnitude(
    model: nn.Module,
    target_names: list[str],
    sparsity: Sparsity,
    granularity: str = "layer",
    *,
    progress: bool = True,
    placement: BlockPlacement | None = None,
) -> OneShotResult:
    """Keep the largest |W|; no calibration data, no forward pass, no weight written."""
    config = MagnitudeConfig(name="magnitude", sparsity=_recipe_sparsity(sparsity), granularity=granularity)
    pruning = MAGNITUDE.block_pruning(config)
    return prune_sequentially(pruning, model, target_names, None, progress=progress, placement=placement)


def wanda(
    model: nn.Module,
    target_names: list[str],
    sparsity: Sparsity,
    granularity: str = "row",
    calib_blocks: Tensor | None = None,
    *,
    batch_size: int = 1,
    progress: bool = True,
    placement: BlockPlacement | None = None,
) -> OneShotResult:
    """Wanda: keep the largest |W_ij| * ||X_j||; per output row by default, as in the paper."""
    config = WandaConfig(name="wanda", sparsity=_recipe_sparsity(sparsity), granularity=granularity)
    return prune_sequentially(
        WANDA.block_pruning(config),
        model,
        target_names,
        calib_blocks,
        batch_size=batch_size,
        progress=progress,
        placement=placement,
    )


def sparsegpt(
    model: nn.Module,
    target_names: list[str],
    sparsity: Sparsity,
    calib_blocks: Tensor,
    *,
    blocksize: int = 128,
    dampening: float = 0.01,
    update_weights: bool = True,
    batch_size: int = 1,
    progress: bool = True,
    placement: BlockPlacement | None = None,
    in_place: bool = False,
) -> OneShotResult:
    """SparseGPT: OBS mask selection; with `update_weights` the surviving weights are re-fit and returned
    in `weights` (the model itself is restored; apply them with the masks). With `in_place` the pruned and
    re-fit weights stay in the model instead and only the masks come back (no copy of the model's targets)."""
    config = SparseGPTConfig(
        name="sparsegpt",
        sparsity=_recipe_sparsity(sparsity),
        blocksize=blocksize,
        dampening=dampening,
        update_weights=update_weights,
    )
    return prune_sequentially(
        SPARSEGPT.block_pruning(config),
        model,
        target_names,
        calib_blocks,
        batch_size=batch_size,
        progress=progress,
        placement=placement,
        in_place=in_place,
    )
