"""One-shot structured baselines at a size budget: heads and FFN neurons ranked by a score, then removed.

Scores (pure tensor math, from the structural map's table, so every family gets them for free):
- `magnitude`: the L2 norm of all the weights a unit owns (a head unit's q/k/v rows and o columns, a
  neuron's gate/up rows and down column);
- `activation` (Wanda-style, |W| * ||X||): per input channel of the output projection, the norm of its
  calibration activations times the norm of its weight column, summed over the unit's channels.
Allocation: the same share of head units and of neurons is removed in every layer, the smallest share that
meets the target (bisection on the exact size arithmetic); each layer keeps its best-scored units. The
decisions become fixed gates, so saving, export and reporting are those of every structural method.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from prune.core.errors import UserInputError
from prune.structural.gates import FixedGate, attach_unit_gates, rounded_count
from prune.structural.store import (
    StructuralBudgetConfig,
    export_gated,
    load_gated,
    report_gated,
    save_gates,
    budget_reachable,
)
from prune.core.config import StrictConfig
from prune.methods.spec import MethodSpec
from prune.structural.layout import FFN, HEADS, Counts, Structure, structure_of


class BaselineUnits(StrictConfig):
    """Which structural units the baseline removes."""

    heads: bool = Field(True, description="remove attention head units")
    ffn: bool = Field(True, description="remove FFN neurons")


class StructuredConfig(StructuralBudgetConfig):
    """One-shot structured baseline: units ranked by a score, the same share removed in every layer."""

    score: Literal["magnitude", "activation"] = Field("magnitude", description="weight L2 norm, or Wanda-style |W|*||X||")
    units: BaselineUnits = Field(default_factory=BaselineUnits, description="which structural units are removed")

    def kinds(self) -> set[str]:
        return {kind for kind, on in ((HEADS, self.units.heads), (FFN, self.units.ffn)) if on}


def unit_weight_norms(model: nn.Module, structure: Structure, kind: str, layer: int) -> Tensor:
    """Per unit: the L2 norm of every weight along that unit's channels, over the layer's parameters."""
    total = torch.zeros(getattr(structure, kind)[layer])
    for relative, entry in structure.layer_entries.items():
        if entry.name is None:
            continue
        tensor = model.get_parameter(structure.layer_name(layer, relative)).detach().float()
        for dim, axis in enumerate(entry.axes):
            if axis.kind == kind:
                moved = tensor.movedim(dim, 0).reshape(axis.segments, total.numel(), axis.unit, -1)
                total += moved.pow(2).sum(dim=(0, 2, 3))
    return total.sqrt()


@torch.no_grad()
def output_input_norms(model: nn.Module, structure: Structure, calibration: Tensor) -> dict[str, Tensor]:
    """Sum of squares per input channel of every output projection (heads' and neurons'), over calibration."""
    names = [structure.layer_name(i, rel) for i in range(structure.num_layers) for rel in (structure.attn_out, structure.ffn_out)]
    sums: dict[str, Tensor] = {}
    handles = []
    for name in names:
        def hook(module, args, name=name):
            x = args[0].detach().float()
            sums[name] = sums.get(name, 0) + x.reshape(-1, x.shape[-1]).pow(2).sum(0)
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for row in calibration:
            model(input_ids=row[None].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: value.cpu() for name, value in sums.items()}


def activation_scores(model: nn.Module, structure: Structure, kind: str, layer: int, norms: dict[str, Tensor]) -> Tensor:
    """Per unit: sum over its channels c of ||X_c|| * ||W_out[:, c]|| (the output projection's column)."""
    relative = structure.attn_out if kind == HEADS else structure.ffn_out
    entry = structure.layer_entries[f"{relative}.weight"]
    dim = next(d for d, axis in enumerate(entry.axes) if axis.kind == kind)
    weight = model.get_parameter(structure.layer_name(layer, f"{relative}.weight")).detach().float()
    column_norms = weight.movedim(dim, 0).reshape(weight.shape[dim], -1).norm(dim=1)
    channel = norms[structure.layer_name(layer, relative)].sqrt() * column_norms
    return channel.reshape(getattr(structure, kind)[layer], -1).sum(1)


def uniform_counts(structure: Structure, kinds: set[str], share: float, round_to: int | None) -> Counts:
    """Kept counts when the same `share` of head units and neurons goes in every layer."""
    def ffn(n: int) -> int:
        kept = max(1, round(n * (1 - share)))
        return max(1, rounded_count(kept, round_to, n)) if round_to else kept

    return Counts(
        hidden=structure.hidden,
        heads=[max(1, round(n * (1 - share))) if HEADS in kinds else n for n in structure.heads],
        ffn=[ffn(n) if FFN in kinds else n for n in structure.ffn],
        layers=[1] * structure.num_layers,
    )


def allocate(structure: Structure, config: StructuredConfig) -> Counts:
    """The smallest uniform per-layer share that removes at least the target (bisection)."""
    kinds, quantity, seq = config.kinds(), config.quantity, config.flops_seq_len
    dense = float(structure.size(structure.full_counts(), quantity, seq))
    limit = dense * (1.0 - config.share)
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if float(structure.size(uniform_counts(structure, kinds, middle, config.round_to), quantity, seq)) <= limit:
            high = middle
        else:
            low = middle
    return uniform_counts(structure, kinds, high, config.round_to)


def _keep_top(scores: Tensor, count: int) -> Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.topk(scores, count).indices] = True
    return keep


def attach_structured(model: nn.Module, config: StructuredConfig, calibration: Tensor | None) -> None:
    """Score the units, allocate the budget, and gate the model with the fixed decisions."""
    kinds = config.kinds()
    if not kinds:
        raise UserInputError("structured needs units.heads or units.ffn on.")
    structure = structure_of(model)
    budget_reachable(structure, kinds, config.quantity, config.share, config.flops_seq_len)
    counts = allocate(structure, config)
    if config.score == "activation":
        if calibration is None:
            raise UserInputError("score: activation needs calibration data (data.calibration_samples blocks).")
        norms = output_input_norms(model, structure, calibration)

    def make(kind: str, size: int, layer: int | None):
        if kind not in kinds:
            return None
        if config.score == "activation":
            scores = activation_scores(model, structure, kind, layer, norms)
        else:
            scores = unit_weight_norms(model, structure, kind, layer)
        count = (counts.heads if kind == HEADS else counts.ffn)[layer]
        return FixedGate(kind, _keep_top(scores, count), layer)

    attach_unit_gates(model, structure, make)


STRUCTURED = MethodSpec(
    "structured", StructuredConfig, attach_structured, kind="oneshot", needs_calibration=True,
                 save=save_gates, load=load_gated, export=export_gated, report=report_gated
)
