"""One-shot structured baselines at a size budget: heads and FFN neurons ranked by a score, then removed.

Scores (pure tensor math, from the structural map's table, so every family gets them for free):
- `magnitude`: the L2 norm of all the weights a unit owns (a head unit's q/k/v rows and o columns, a
  neuron's gate/up rows and down column);
- `activation` (Wanda-style, |W| * ||X||): per input channel of the output projection, the norm of its
  calibration activations times the norm of its weight column, summed over the unit's channels.
Allocation: the same share of head units and of neurons is removed in every layer, the smallest share that
meets the target (bisection on the exact size arithmetic); each layer keeps its best-scored units. The
decisions become fixed gates, so saving, export and reporting are those of every structural method.

Because the counts come from the structural map alone and the scores are per layer, the method runs block by
block: under runtime.offload: cpu the activation statistics are read with each block on the device (the
layer-by-layer driver's `collect_stats`, which the in-memory run uses too); under offload: disk
(`write_streamed`) each block is scored and sliced as the export slices it, and the smaller checkpoint is written
shard by shard.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from prune.calibration.input_norms import WandaStats
from prune.calibration.layerwise import BlockPlacement, collect_stats
from prune.calibration.streaming import skeleton, stream_rewrite
from prune.core.errors import UserInputError
from prune.methods.spec import MethodSpec, StreamedExport
from prune.methods.structured import config as declared
from prune.methods.structured.config import StructuredConfig
from prune.models.blocks import in_out_features
from prune.structural.config import FFN, HEADS, HIDDEN, LAYERS
from prune.structural.gates import FixedGate, GateSet, attach_unit_gates, rounded_count
from prune.structural.layout import Counts, Structure, structure_of
from prune.structural.shrink import LAYER_SIZES_KEY, shrunk_config, shrunk_state
from prune.structural.store import (
    budget_reachable,
    export_gated,
    load_gated,
    report_gated,
    save_gates,
    summary,
)


def unit_weight_norms(model: nn.Module, structure: Structure, kind: str, layer: int) -> Tensor:
    """Per unit: the L2 norm of every weight along that unit's channels, over the layer's parameters."""
    total = torch.zeros(getattr(structure, kind)[layer])
    for relative, entry in structure.layer_entries.items():
        if entry.name is None:
            continue
        tensor = model.get_parameter(structure.layer_name(layer, relative)).detach().float().cpu()
        for dim, axis in enumerate(entry.axes):
            if axis.kind == kind:
                moved = tensor.movedim(dim, 0).reshape(axis.segments, total.numel(), axis.unit, -1)
                total += moved.pow(2).sum(dim=(0, 2, 3))
    return total.sqrt()


def _output_projections(structure: Structure) -> list[str]:
    """The attention-output and FFN-output projection of every layer: whose inputs `activation` reads."""
    return [
        structure.layer_name(i, rel)
        for i in range(structure.num_layers)
        for rel in (structure.attn_out, structure.ffn_out)
    ]


def _sum_of_squares(module: nn.Module) -> WandaStats:
    return WandaStats(in_out_features(module)[0])


def output_input_norms(
    model: nn.Module, structure: Structure, calibration: Tensor, placement: BlockPlacement | None = None
) -> dict[str, Tensor]:
    """Sum of squares per input channel of every output projection (heads' and neurons'), over calibration, on
    the dense model, block by block (prune.calibration.layerwise.collect_stats: each block visits the work device
    under a `placement`, so offload: cpu reads the same statistics as the model on the device)."""
    stats = collect_stats(
        model,
        _output_projections(structure),
        _sum_of_squares,
        calibration,
        share_inputs=False,
        progress=False,
        placement=placement,
    )
    return _norms(stats)


def _norms(stats: dict) -> dict[str, Tensor]:
    return {name: acc.input_sq_norm().cpu() for name, acc in stats.items()}


def activation_scores(
    model: nn.Module, structure: Structure, kind: str, layer: int, norms: dict[str, Tensor]
) -> Tensor:
    """Per unit: sum over its channels c of ||X_c|| * ||W_out[:, c]|| (the output projection's column)."""
    relative = structure.attn_out if kind == HEADS else structure.ffn_out
    entry = structure.layer_entries[f"{relative}.weight"]
    dim = next(d for d, axis in enumerate(entry.axes) if axis.kind == kind)
    weight = model.get_parameter(structure.layer_name(layer, f"{relative}.weight")).detach().float().cpu()
    column_norms = weight.movedim(dim, 0).reshape(weight.shape[dim], -1).norm(dim=1)
    channel = norms[structure.layer_name(layer, relative)].sqrt() * column_norms
    return channel.reshape(getattr(structure, kind)[layer], -1).sum(1)


def uniform_counts(
    structure: Structure, kinds: set[str], share: float, round_to: int | None, layers: list[int] | None = None
) -> Counts:
    """Kept counts when the same `share` of head units and neurons goes in every layer (`layers`: 1 per kept
    layer, 0 per layer already removed; default every layer kept)."""

    def ffn(n: int) -> int:
        kept = max(1, round(n * (1 - share)))
        return max(1, rounded_count(kept, round_to, n)) if round_to else kept

    return Counts(
        hidden=structure.hidden,
        heads=[max(1, round(n * (1 - share))) if HEADS in kinds else n for n in structure.heads],
        ffn=[ffn(n) if FFN in kinds else n for n in structure.ffn],
        layers=list(layers) if layers is not None else [1] * structure.num_layers,
    )


def allocate(structure: Structure, config: StructuredConfig, layers: list[int] | None = None) -> Counts:
    """The smallest uniform per-layer share that removes at least the target (bisection), the removed `layers`
    counted towards it."""
    kinds, quantity, seq = config.kinds(), config.quantity, config.flops_seq_len
    dense = float(structure.size(structure.full_counts(), quantity, seq))
    limit = dense * (1.0 - config.share)
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        counts = uniform_counts(structure, kinds, middle, config.round_to, layers)
        if float(structure.size(counts, quantity, seq)) <= limit:
            high = middle
        else:
            low = middle
    return uniform_counts(structure, kinds, high, config.round_to, layers)


def _keep_top(scores: Tensor, count: int) -> Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.topk(scores, count).indices] = True
    return keep


def allocated_counts(structure: Structure, config: StructuredConfig, layers: list[int] | None = None) -> Counts:
    """The kept counts per layer, from the structural map alone (before any weight or data is read); `layers`:
    1 per kept layer, 0 per layer another method (depth) already removed, counted towards the target."""
    kinds = config.kinds()
    if not kinds:
        raise UserInputError("structured needs units.heads or units.ffn on.")
    budget_reachable(structure, kinds, config.quantity, config.share, config.flops_seq_len, layers)
    return allocate(structure, config, layers)


def layer_keeps(
    model: nn.Module,
    structure: Structure,
    config: StructuredConfig,
    counts: Counts,
    layer: int,
    norms: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Per unit kind removed: the bool keep of `layer`'s units, its best-scored `counts` (from that layer's own
    weights, and for `activation` its output projections' input norms)."""
    keeps = {}
    for kind in config.kinds():
        if config.score == "activation":
            scores = activation_scores(model, structure, kind, layer, norms)
        else:
            scores = unit_weight_norms(model, structure, kind, layer)
        keeps[kind] = _keep_top(scores, (counts.heads if kind == HEADS else counts.ffn)[layer])
    return keeps


def _calibration(config: StructuredConfig, calibration: Tensor | None) -> Tensor | None:
    if config.score == "activation" and calibration is None:
        raise UserInputError("score: activation needs calibration data (data.calibration_samples blocks).")
    return calibration if config.score == "activation" else None


def attach_structured(
    model: nn.Module, config: StructuredConfig, calibration: Tensor | None, placement: BlockPlacement | None = None
) -> None:
    """Score the units, allocate the budget, and gate the model with the fixed decisions. Under offload: cpu
    (`placement`) the activation statistics are read with each block on the work device; the scores and gates
    are computed where the model waits."""
    structure = structure_of(model)
    counts = allocated_counts(structure, config)
    calibration = _calibration(config, calibration)
    norms = output_input_norms(model, structure, calibration, placement) if calibration is not None else {}
    keeps = [layer_keeps(model, structure, config, counts, layer, norms) for layer in range(structure.num_layers)]
    attach_unit_gates(
        model, structure, lambda kind, size, layer: _fixed_gate(keeps, kind, layer) if layer is not None else None
    )


def _fixed_gate(keeps: list[dict[str, Tensor]], kind: str, layer: int) -> FixedGate | None:
    """The one-shot gate of `layer`'s `kind` units, or None where that kind is not pruned."""
    return FixedGate(kind, keeps[layer][kind], layer) if kind in keeps[layer] else None


# ----------------------------------------------------------------------------- streamed (runtime.offload: disk)


def _decisions(structure: Structure, keeps: list[dict[str, Tensor]]) -> dict:
    """What prune.structural.shrink slices by: the one-shot gates' decisions (kept units at value 1)."""

    def one(keep: Tensor) -> tuple[Tensor, Tensor]:
        return keep, keep.float()

    full = {HEADS: structure.heads, FFN: structure.ffn}
    return {
        HIDDEN: one(torch.ones(structure.hidden, dtype=torch.bool)),
        HEADS: [one(keeps[i].get(HEADS, torch.ones(full[HEADS][i], dtype=torch.bool))) for i in range(len(keeps))],
        FFN: [one(keeps[i].get(FFN, torch.ones(full[FFN][i], dtype=torch.bool))) for i in range(len(keeps))],
        LAYERS: [],
    }


def _first_units(structure: Structure, counts: Counts) -> list[dict[str, Tensor]]:
    """Stand-in keeps with the allocated counts: every shape of the smaller model, before any weight is read."""

    def first(count: int, size: int) -> Tensor:
        return torch.arange(size) < count

    return [
        {HEADS: first(counts.heads[i], structure.heads[i]), FFN: first(counts.ffn[i], structure.ffn[i])}
        for i in range(structure.num_layers)
    ]


def _streamed_config(model: nn.Module, config: StructuredConfig):
    """The smaller model's config (uniform counts fix it before any data is read); refused when plain
    transformers cannot describe it, since the streamed run writes and measures that checkpoint as such."""
    structure = structure_of(model)
    counts = allocated_counts(structure, config)
    smaller = shrunk_config(model.config, structure, _decisions(structure, _first_units(structure, counts)))
    if hasattr(smaller, LAYER_SIZES_KEY):
        raise UserInputError(
            f"runtime.offload: disk writes structured's smaller {structure.family} model as a plain transformers "
            f"checkpoint, and its kept sizes ({counts.heads[0]} head units of {structure.heads[0]}, "
            f"{counts.ffn[0]} neurons of {structure.ffn[0]} per layer) are not ones the standard config fields can "
            "say (heads x head_dim must divide or equal the width); use runtime.offload: cpu (the export then "
            "records per-layer sizes), or units.heads: false."
        )
    return smaller


def check_streamed(model: nn.Module, config: StructuredConfig) -> None:
    """Everything `write_streamed` would refuse, from the skeleton alone (before the output is claimed)."""
    _streamed_config(model, config)


def write_streamed(
    checkpoint: Path,
    output: Path,
    config: StructuredConfig,
    calibration: Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """Structured pruning of the checkpoint streamed block by block into the smaller checkpoint the in-memory
    export writes: each block's units scored as in memory (its own weights, its dense input norms), its
    tensors sliced by prune.structural.shrink's own slicing. Returns the structural figures of the report."""
    model = skeleton(checkpoint, dtype)
    structure = structure_of(model)
    counts = allocated_counts(structure, config)
    keeps: list[dict[str, Tensor]] = [{} for _ in range(structure.num_layers)]

    def decide(placed: nn.Module, layer: int, stats: dict) -> None:
        keeps[layer] = layer_keeps(placed, structure, config, counts, layer, _norms(stats))

    def rewrite(name: str, tensor: Tensor) -> Tensor:
        return shrunk_state({name: tensor}, structure, _decisions(structure, keeps))[name]

    calibration = _calibration(config, calibration)
    stream_rewrite(
        checkpoint,
        output,
        _streamed_config(model, config),
        rewrite,
        decide,
        lambda placed: _output_projections(structure),
        _sum_of_squares if calibration is not None else None,
        calibration,
        device=device,
        dtype=dtype,
    )
    layers = range(structure.num_layers)
    gates = GateSet(
        structure,
        heads=[_fixed_gate(keeps, HEADS, i) for i in layers],
        ffn=[_fixed_gate(keeps, FFN, i) for i in layers],
        layers=[None] * structure.num_layers,
    )
    return summary(gates, config.flops_seq_len)


STRUCTURED = MethodSpec(
    declared.STRUCTURED,
    attach_structured,
    needs_calibration=True,
    save=save_gates,
    load=load_gated,
    export=export_gated,
    report=report_gated,
    streamed_export=StreamedExport(check_streamed, write_streamed),
)
