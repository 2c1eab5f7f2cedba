"""A gated model's structural decisions: found in the model, saved, reloaded, exported and reported.

Shared by every structural method (VIB, the one-shot structured baselines): their common config keys
(`StructuralBudgetConfig`: a params/FLOPs target instead of a sparsity) and the same `save`, `export` and
`report` hooks. Saved format, in the run directory's usual two files:
`masks.safetensors` holds per gate `<kind>[.<layer>].keep` (uint8 per unit) and `<kind>[.<layer>].value`
(float32: the multiplier of each kept unit, folded into the weights by the export); `masks.json` holds the
method's metadata and a `structural` section (family, unit counts, kinds, and the count rules).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from prune.core.atomic import write_tensors_with_json
from prune.core.config import MethodConfig
from prune.core.errors import UserInputError
from prune.core.tensor_fit import check_fit
from prune.masks.base import unwrap, wrappers
from prune.masks.storage import CONFIG_FILE, TENSORS_FILE
from prune.structural.gates import FixedGate, GateSet, UnitGate, attach_unit_gates
from prune.structural.layout import FFN, HEADS, HIDDEN, LAYERS, Counts, Structure, structure_of
from prune.structural.shrink import layer_sizes, shrink

FORMAT = "structural-v1"
QUANTITIES = ("params", "flops")


def parse_budget(value) -> dict[str, float]:
    """{params: t} or {flops: t}, t the share removed in (0, 1)."""
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in QUANTITIES:
        raise ValueError(f"target must be one of {{params: t}} or {{flops: t}} (t = the share removed), got {value!r}")
    quantity, share = next(iter(value.items()))
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
        raise ValueError(f"target {quantity} must be a share removed strictly between 0 and 1, got {share!r}")
    return {quantity: float(share)}


class StructuralBudgetConfig(MethodConfig):
    """Keys every structural method shares: a size/FLOPs target instead of an N:M/fraction sparsity."""

    sparsity: str | float | None = Field(
        None, description="unused: the budget is `target` (a fraction here means params)"
    )
    targets: list[str] | None = Field(
        None, description="unused: structural methods prune units (see `units`), not chosen linears"
    )
    skip_incompatible: bool = Field(False, description="unused: no N:M groups here")
    target: dict[str, float] = Field(
        default_factory=lambda: {"params": 0.5}, description="{params: t} or {flops: t}: the share removed"
    )
    flops_seq_len: int = Field(512, ge=1, description="sequence length at which FLOPs are counted")
    round_to: int | None = Field(
        None, ge=1, description="round kept FFN / hidden sizes to a multiple (export.round_to)"
    )
    uniform: bool = Field(False, description="the same sizes in every layer, so plain transformers loads the export")

    @field_validator("sparsity", mode="before")
    @classmethod
    def _valid_sparsity(cls, value):
        if value is None or isinstance(value, float) and 0.0 < value < 1.0:
            return value
        raise ValueError(
            f"structural methods take a size budget, `target: {{params: 0.5}}` or `{{flops: 0.5}}`, not sparsity "
            f"{value!r}; drop `sparsity` (a plain fraction such as 0.5 is read as a params target)."
        )

    @field_validator("target", mode="before")
    @classmethod
    def _valid_budget(cls, value):
        return parse_budget(value)

    @model_validator(mode="after")
    def _sparsity_as_budget(self):
        if self.targets is not None:
            raise ValueError("structural methods prune units, not chosen linears: drop `targets` and use `units`.")
        if isinstance(self.sparsity, float) and "target" not in self.model_fields_set:
            object.__setattr__(self, "target", {"params": self.sparsity})
        return self

    @property
    def pattern(self):
        raise UserInputError(f"method {self.name} has a size target ({self.target_label()}), not an N:M pattern.")

    @property
    def quantity(self) -> str:
        return next(iter(self.target))

    @property
    def share(self) -> float:
        return self.target[self.quantity]

    def target_label(self) -> str:
        return f"{self.quantity} {self.share:g}"


def gate_set(model: nn.Module) -> GateSet:
    """The GateSet of a gated model, rebuilt from the gates its wrappers own."""
    structure = structure_of(model)
    gates = GateSet(
        structure,
        heads=[None] * structure.num_layers,
        ffn=[None] * structure.num_layers,
        layers=[None] * structure.num_layers,
    )
    for wrapper in wrappers(model).values():
        gate = wrapper.mask
        if not isinstance(gate, UnitGate):
            continue
        if gate.kind == HIDDEN:
            gates.hidden = gate
        else:
            getattr(gates, gate.kind)[gate.layer] = gate
    if not gates.all():
        raise UserInputError(
            "the model carries no structural gates; attach a structural method (vib, structured) first."
        )
    return gates


def _key(gate: UnitGate) -> str:
    return gate.kind if gate.layer is None else f"{gate.kind}.{gate.layer}"


def summary(gates: GateSet, seq_len: int = 512) -> dict:
    """Parameters and FLOPs (per [1, seq_len] forward) of the dense and the hard-gated model, and the sizes."""
    structure = gates.structure
    dense, kept = structure.full_counts(), gates.counts()
    figures = {}
    for quantity in ("params", "flops"):
        before, after = float(structure.size(dense, quantity, seq_len)), float(structure.size(kept, quantity, seq_len))
        figures[quantity] = {"dense": int(before), "kept": int(after), "removed": 1.0 - after / before}
    figures["hidden"] = int(kept.hidden)
    decisions = gates.decisions()
    figures["layers"] = layer_sizes(structure, decisions)
    figures["kept_layers"] = [
        i for i in range(structure.num_layers) if not decisions[LAYERS] or bool(decisions[LAYERS][i][0][0])
    ]
    figures["seq_len"] = seq_len
    return figures


def save_gates(model: nn.Module, directory: Path, config, meta: dict) -> None:
    """Write masks.safetensors + masks.json (atomically) for every gate of the model."""
    gates = gate_set(model)
    structure = gates.structure
    tensors = {}
    for gate in gates.all():
        keep = gate.hard().detach().cpu()
        tensors[f"{_key(gate)}.keep"] = keep.to(torch.uint8)
        tensors[f"{_key(gate)}.value"] = gate.hard_value().detach().float().cpu().contiguous()
    info = {
        "format": FORMAT,
        "family": structure.family,
        "hidden": structure.hidden,
        "heads": structure.heads,
        "ffn": structure.ffn,
        "kinds": sorted({gate.kind for gate in gates.all()}),
        "summary": summary(gates, getattr(config, "flops_seq_len", 512)),
    }
    content = {"format_version": 1, **meta, "structural": info, "targets": {}}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_tensors_with_json(directory, TENSORS_FILE, tensors, CONFIG_FILE, content)


def load_gates(model: nn.Module, directory: Path) -> GateSet:
    """Attach the saved decisions to the base model as fixed gates, after checking they fit it."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(directory / TENSORS_FILE)
    except (OSError, json.JSONDecodeError, SafetensorError) as error:
        raise UserInputError(f"structural masks in {directory} are unreadable ({error}); rerun `prune run`.") from None
    info = meta.get("structural") or {}
    structure = structure_of(model)
    if (info.get("hidden"), info.get("heads"), info.get("ffn")) != (structure.hidden, structure.heads, structure.ffn):
        raise UserInputError(
            f"the structural masks in {directory} were made for another model ({meta.get('model', '?')}: hidden "
            f"{info.get('hidden')}, heads {info.get('heads')}); load them into the model they were made for."
        )
    kinds = set(info.get("kinds", []))

    def make(kind: str, size: int, layer: int | None):
        if kind not in kinds:
            return None
        key = kind if layer is None else f"{kind}.{layer}"
        names = {f"{key}.keep": torch.uint8, f"{key}.value": torch.float32}  # as save_gates writes them
        check_fit(
            {name: tensors[name] for name in names if name in tensors},
            {name: torch.empty(size, dtype=dtype) for name, dtype in names.items()},
            f"the structural masks in {directory} (model {meta.get('model', '?')})",
            "Load them into the model they were made for.",
        )
        return FixedGate(kind, tensors[f"{key}.keep"].bool(), layer, scale=tensors[f"{key}.value"])

    return attach_unit_gates(model, structure, make)


def load_gated(model: nn.Module, directory: Path, config=None) -> nn.Module:
    """The registered load: the saved decisions on the base model as fixed gates (see `load_gates`)."""
    load_gates(model, directory)
    return model


def export_gated(model: nn.Module, config=None) -> nn.Module:
    """The registered export: the physically smaller model (prune.structural.shrink), with its summary attached."""
    gates = gate_set(model)
    figures = summary(gates, getattr(config, "flops_seq_len", 512))
    decisions, structure = gates.decisions(), gates.structure
    unwrap(model)
    exported = shrink(model, structure, decisions)
    exported.maskprune_summary = figures  # read by `report_gated`; a plain attribute, never saved
    return exported


def report_gated(model: nn.Module, config, heldout, report: dict) -> dict:
    """Report entries: achieved removal in the target's own unit, sizes, and the measured speedup."""
    figures = getattr(model, "maskprune_summary", None)
    if figures is None:
        return {}
    quantity = next(iter(getattr(config, "target", {"params": 0})))
    entries = {
        "sparsity": {"target": config.target_label(), "achieved": figures[quantity]["removed"], "measure": quantity},
        "structure": figures,
    }
    dense, pruned = (report.get("dense") or {}).get("latency"), report.get("latency")
    if dense and pruned:
        entries["speedup"] = {
            "prefill": pruned["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
            "decode": dense["decode_ms_per_token"] / pruned["decode_ms_per_token"],
        }
    return entries


def budget_reachable(
    structure: Structure,
    kinds: set[str],
    quantity: str,
    removed: float,
    seq_len: int,
    layers: Sequence[int] | None = None,
) -> float:
    """The largest removable share of `quantity` with these unit kinds (raises if `removed` is beyond it): every
    layer keeps one head unit and one neuron, the residual stream one channel. `layers` (1 kept, 0 removed per
    layer): the blocks depth pruning already removed, whose share must stay below `removed`."""
    low = Counts(
        hidden=1 if HIDDEN in kinds else structure.hidden,
        heads=[1 if HEADS in kinds else n for n in structure.heads],
        ffn=[1 if FFN in kinds else n for n in structure.ffn],
        layers=list(layers) if layers is not None else [0 if LAYERS in kinds else 1] * structure.num_layers,
    )
    dense = float(structure.size(structure.full_counts(), quantity, seq_len))
    reachable = 1.0 - float(structure.size(low, quantity, seq_len)) / dense
    if layers is not None:
        full = structure.full_counts()
        depth_only = (
            1.0
            - float(structure.size(Counts(full.hidden, full.heads, full.ffn, list(layers)), quantity, seq_len)) / dense
        )
        if removed <= depth_only:
            raise UserInputError(
                f"target {quantity} {removed} is already met by the removed blocks alone ({depth_only:.3f} of the "
                f"{quantity}); raise the width target above it, or remove fewer blocks."
            )
    if removed >= reachable:
        off = [kind for kind in (HIDDEN, LAYERS) if kind not in kinds]
        raise UserInputError(
            f"target {quantity} {removed} cannot be reached: with units {sorted(kinds)} at most "
            f"{reachable:.3f} of the {quantity} can be removed (embeddings, norms, one head unit and one neuron "
            f"per layer stay). Lower the target{', or switch on units ' + ', '.join(off) if off else ''}."
        )
    return reachable
