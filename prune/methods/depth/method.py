"""Depth pruning: whole decoder blocks removed, exported as a plain transformers model with fewer layers.

1. Importance (prune.methods.depth.importance): ShortGPT's Block Influence of every block, from the dense model
   on the calibration windows (the TRAIN part).
2. Choice (prune.methods.depth.search): greedy on the validation loss of the actual removal set, among the
   `candidates` lowest-importance kept blocks per step, checked against the score-only set. A removed block is
   skipped as identity (its output is its input): the layer gates of the structural map
   (prune.structural.gates.GatedDecoderLayer), opened and closed in place during the search.
3. Width (optional, `width`): structured's one-shot width pruning of the kept blocks (scores from the dense
   model, as structured alone computes them), allocated so that the whole model loses `width.target`, the
   dropped blocks included.
4. The decisions become fixed gates, so saving, loading, export and the report are every structural method's
   (prune.structural.store). The export (prune.structural.shrink) builds the model from its new config
   (`num_hidden_layers`, per-layer lists such as `layer_types` sliced), so every attention module's `layer_idx`
   is its new position and the KV cache is indexed by it; plain `from_pretrained` loads it.

Supported: the structural map's families (Llama-style decoders and GPT-2), in any dtype; refused: a GPT-2 that
scales attention by layer index (removing a block would change every later block's scaling).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from eval.perplexity import perplexity
from prune.core.errors import UserInputError
from prune.masks.base import unwrap
from prune.methods.depth import config as declared
from prune.methods.depth.config import DepthConfig
from prune.methods.depth.importance import block_importance
from prune.methods.depth.search import greedy_removal
from prune.methods.spec import HeldOut, MethodSpec
from prune.methods.structured.method import allocated_counts, layer_keeps, output_input_norms
from prune.structural.config import LAYERS
from prune.structural.gates import FixedGate, attach_unit_gates
from prune.structural.layout import Structure, structure_of
from prune.structural.store import export_gated, load_gated, report_gated, save_gates

RECORD = "maskprune_depth"  # the model attribute holding the choice's record until export (never saved with it)


def check_depth(model: nn.Module, config: DepthConfig) -> None:
    """Everything the model's structure alone rules out: an unsupported family, a GPT-2 scaling attention by layer
    index, a count of blocks out of range, a width target not beyond what the removed blocks remove."""
    structure = structure_of(model)
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise UserInputError(
            "depth cannot remove blocks of a GPT-2 that scales attention by layer index "
            "(scale_attn_by_inverse_layer_idx): every later block's scaling would change. Use width pruning instead."
        )
    count = config.blocks_removed(structure.num_layers)
    if config.width is not None:
        # exact when the blocks are alike (every model not already pruned): which ones go does not change the
        # size; attach checks the chosen set again
        allocated_counts(structure, config.width, _kept(structure, range(count)))


def _kept(structure: Structure, removed) -> list[int]:
    gone = set(removed)
    return [int(index not in gone) for index in range(structure.num_layers)]


@contextmanager
def removable_blocks(model: nn.Module, structure: Structure):
    """Open layer gates on every block; yields `remove(blocks)`, which skips exactly `blocks` (as identity) from
    then on. The model is unwrapped again on exit."""
    gates = attach_unit_gates(
        model,
        structure,
        lambda kind, size, layer: (
            FixedGate(kind, torch.ones(size, dtype=torch.bool), layer) if kind == LAYERS else None
        ),
    )

    def remove(blocks: list[int]) -> None:
        for index, gate in enumerate(gates.layers):
            gate.keep.fill_(index not in blocks)

    try:
        yield remove
    finally:
        unwrap(model)


def choose_blocks(
    model: nn.Module, structure: Structure, config: DepthConfig, calibration: Tensor, selection: Tensor | None
) -> tuple[list[int], dict]:
    """(the removed blocks, the record of the choice): importance on `calibration`, the search on `selection`."""
    count = config.blocks_removed(structure.num_layers)
    if config.candidates > 1 and selection is None:
        raise UserInputError(
            "depth chooses among candidate blocks on validation windows: pass them as `selection` (prune run does), "
            "or set candidates: 1 to remove the blocks of lowest importance without a validation search."
        )
    importance = block_importance(model, structure, calibration)
    with removable_blocks(model, structure) as remove:

        def loss(blocks: list[int]) -> float:
            remove(blocks)
            return perplexity(model, selection, desc=f"validation without blocks {sorted(blocks)}").nll

        removed, record = greedy_removal(importance.tolist(), count, config.candidates, loss)
        if selection is not None:
            remove([])
            record["dense_loss"] = perplexity(model, selection, desc="validation, dense").nll
            record["validation_windows"] = len(selection)
    record["importance"] = importance.tolist()
    record["score"] = config.score
    return removed, record


def attach_depth(
    model: nn.Module, config: DepthConfig, calibration: Tensor | None, selection: Tensor | None = None
) -> None:
    """Choose the blocks to remove (and with `width`, the kept blocks' units) and gate the model with the fixed
    decisions; the choice's record waits on the model for the save, export and report hooks."""
    if calibration is None:
        raise UserInputError("depth scores blocks on calibration data (data.calibration_samples windows).")
    check_depth(model, config)
    structure = structure_of(model)
    removed, record = choose_blocks(model, structure, config, calibration, selection)
    kept = _kept(structure, removed)
    width: list[dict[str, Tensor]] = [{} for _ in kept]
    if config.width is not None:
        counts = allocated_counts(structure, config.width, kept)
        activation = config.width.score == "activation"
        norms = output_input_norms(model, structure, calibration) if activation else {}
        width = [layer_keeps(model, structure, config.width, counts, i, norms) for i in range(structure.num_layers)]

    def make_gate(kind: str, size: int, layer: int | None) -> FixedGate | None:
        if kind == LAYERS:
            return FixedGate(kind, torch.tensor([bool(kept[layer])]), layer)
        return FixedGate(kind, width[layer][kind], layer) if layer is not None and kind in width[layer] else None

    attach_unit_gates(model, structure, make_gate)
    record["kept_layers"] = [index for index, keep in enumerate(kept) if keep]
    setattr(model, RECORD, record)


def save_depth(model: nn.Module, directory: Path, config: DepthConfig, meta: dict) -> None:
    """The structural gates (prune.structural.store.save_gates), the choice's record in masks.json."""
    save_gates(model, directory, config.width or config, {**meta, "depth": getattr(model, RECORD, None)})


def export_depth(model: nn.Module, config: DepthConfig) -> nn.Module:
    """The model with the removed blocks gone (and with `width`, the kept ones sliced), its record carried over."""
    record = getattr(model, RECORD, None)
    exported = export_gated(model, config.width or config)
    exported.maskprune_summary["depth"] = record
    return exported


def report_depth(model: nn.Module, config: DepthConfig, heldout: HeldOut, report: dict) -> dict:
    """The structural entries (params removed, sizes, measured speedup), and `depth`: the kept and removed blocks,
    their importance and every validation evaluation of the choice."""
    entries = report_gated(model, config.width or config, heldout, report)  # achieved in width's target unit
    if entries:
        entries["sparsity"]["target"] = config.target_label()
    figures = getattr(model, "maskprune_summary", None) or {}
    if figures.get("depth") is not None:
        entries["depth"] = figures["depth"]
    return entries


DEPTH = MethodSpec(
    declared.DEPTH,
    attach_depth,
    needs_calibration=True,
    needs_selection=True,
    save=save_depth,
    load=load_gated,
    export=export_depth,
    report=report_depth,
    check=check_depth,
)
