"""One-shot methods, registered: model + targets in, masks (and SparseGPT's updated
weights) out, the model's weights left exactly as they were at entry.

Each function binds the tensor math of its method (`magnitude`, `wanda`, `sparsegpt` modules) to the
layer-by-layer driver `prune.calibration.layerwise.prune_layerwise`, which prunes sequentially (block k+1 is
calibrated on the pruned block k) and restores the original weights at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prune.calibration.input_norms import WandaStats
from prune.calibration.layerwise import BlockPlacement, MakeStats, prune_layerwise
from prune.core.config import MethodConfig
from prune.core.sparsity import Sparsity
from prune.masks.base import attach_hard_masks
from prune.masks.targets import method_targets
from prune.methods.oneshot import config as declared
from prune.methods.oneshot.config import MagnitudeConfig, SparseGPTConfig, WandaConfig
from prune.methods.oneshot.magnitude import magnitude_scores
from prune.methods.oneshot.masking import mask_from_scores
from prune.methods.oneshot.sparsegpt import HessianStats, sparsegpt_prune
from prune.methods.oneshot.wanda import wanda_scores
from prune.methods.spec import BlockPruning, MethodSpec
from prune.models.blocks import in_out_features, weight_matrix


@dataclass
class OneShotResult:
    masks: dict[str, Tensor] = field(default_factory=dict)  # name -> bool [out, in] (CPU), True = keep
    weights: dict[str, Tensor] = field(default_factory=dict)  # name -> updated [out, in] (SparseGPT only)


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

    def prune(name, module, stats):
        return mask_from_scores(magnitude_scores(weight_matrix(module)), sparsity, granularity), None

    result = prune_layerwise(model, target_names, prune, None, progress=progress, placement=placement)
    return OneShotResult(result.masks)


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

    def prune(name, module, stats: WandaStats):
        scores = wanda_scores(weight_matrix(module), stats.input_sq_norm())
        return mask_from_scores(scores, sparsity, granularity), None

    def make_stats(module):
        return WandaStats(in_out_features(module)[0])

    result = prune_layerwise(
        model,
        target_names,
        prune,
        make_stats,
        calib_blocks,
        batch_size=batch_size,
        progress=progress,
        placement=placement,
    )
    return OneShotResult(result.masks)


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
) -> OneShotResult:
    """SparseGPT: OBS mask selection; with `update_weights` the surviving weights are re-fit and returned
    in `weights` (the model itself is restored; apply them with the masks)."""

    def prune(name, module, stats: HessianStats):
        weight = weight_matrix(module)
        new_weight, mask = sparsegpt_prune(
            weight, stats.matrix(), sparsity, blocksize=blocksize, dampening=dampening, update_weights=update_weights
        )
        return mask, (new_weight if update_weights else None)

    def make_stats(module):
        return HessianStats(in_out_features(module)[0])

    result = prune_layerwise(
        model,
        target_names,
        prune,
        make_stats,
        calib_blocks,
        batch_size=batch_size,
        progress=progress,
        placement=placement,
    )
    return OneShotResult(result.masks, result.weights)


def _attach(model: nn.Module, result: OneShotResult) -> None:
    """Write any updated weights into the model, then wrap each target with its fixed mask."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in result.weights.items():
            weight_matrix(modules[name]).copy_(weight)
    attach_hard_masks(model, result.masks)


def _targets(model: nn.Module, config: MethodConfig) -> list[str]:
    return method_targets(model, config.targets, config.pattern, config.skip_incompatible)


def attach_magnitude(
    model: nn.Module, config: MagnitudeConfig, calibration: Tensor | None, placement: BlockPlacement | None = None
) -> None:
    _attach(model, magnitude(model, _targets(model, config), config.pattern, config.granularity, placement=placement))


def attach_wanda(
    model: nn.Module, config: WandaConfig, calibration: Tensor, placement: BlockPlacement | None = None
) -> None:
    _attach(
        model,
        wanda(model, _targets(model, config), config.pattern, config.granularity, calibration, placement=placement),
    )


def attach_sparsegpt(
    model: nn.Module, config: SparseGPTConfig, calibration: Tensor, placement: BlockPlacement | None = None
) -> None:
    result = sparsegpt(
        model,
        _targets(model, config),
        config.pattern,
        calibration,
        blocksize=config.blocksize,
        dampening=config.dampening,
        update_weights=config.update_weights,
        placement=placement,
    )
    _attach(model, result)


# Methods that can prune from statistics gathered once on the dense model (the sweep's shared path), and what
# each reads: nothing (magnitude), the input norms (Wanda), or the Hessian (SparseGPT).
SHARED_STATS: dict[str, str] = {"magnitude": "none", "wanda": "norms", "sparsegpt": "hessian"}


def make_stats_for(config: MethodConfig) -> MakeStats | None:
    """The per-layer accumulator `prune_from_stats` reads for this method (None: magnitude reads no data)."""
    if SHARED_STATS[config.name] == "norms":
        return lambda module: WandaStats(in_out_features(module)[0])
    if SHARED_STATS[config.name] == "hessian":
        return lambda module: HessianStats(in_out_features(module)[0])
    return None


def targets_of(config: MethodConfig):
    """`model -> target names` for this config (the streamed driver asks once it has built the skeleton)."""
    return lambda model: _targets(model, config)


def prune_from_stats(config: MethodConfig, module: nn.Module, stats) -> tuple[Tensor, Tensor | None]:
    """One target's keep-mask (and SparseGPT's re-fit weight, else None) from given statistics, without any
    calibration forward: `stats` answers `input_sq_norm()` (Wanda) / `matrix()` (SparseGPT), None for magnitude.
    The module is not modified."""
    weight, sparsity = weight_matrix(module), config.pattern
    if config.name == "magnitude":
        return mask_from_scores(magnitude_scores(weight), sparsity, config.granularity), None
    if config.name == "wanda":
        return mask_from_scores(wanda_scores(weight, stats.input_sq_norm()), sparsity, config.granularity), None
    if config.name == "sparsegpt":
        new_weight, mask = sparsegpt_prune(
            weight,
            stats.matrix(),
            sparsity,
            blocksize=config.blocksize,
            dampening=config.dampening,
            update_weights=config.update_weights,
        )
        return mask, (new_weight if config.update_weights else None)
    raise KeyError(f"method {config.name!r} cannot prune from shared statistics; see SHARED_STATS")


def block_pruning(config: MethodConfig) -> BlockPruning:
    """The MethodSpec hook: this config's statistics and its per-target pruning from them (prune_from_stats),
    what the layer-by-layer driver needs to prune a model streamed block by block."""
    return BlockPruning(make_stats_for(config), lambda name, module, stats: prune_from_stats(config, module, stats))


MAGNITUDE = MethodSpec(
    declared.MAGNITUDE,
    attach_magnitude,
    needs_calibration=False,
    block_pruning=block_pruning,
    targets=_targets,
)
WANDA = MethodSpec(
    declared.WANDA,
    attach_wanda,
    needs_calibration=True,
    block_pruning=block_pruning,
    targets=_targets,
)
SPARSEGPT = MethodSpec(
    declared.SPARSEGPT,
    attach_sparsegpt,
    needs_calibration=True,
    block_pruning=block_pruning,
    targets=_targets,
)
