"""A gated model's structural decisions: found in the model, saved, reloaded, exported and reported.

Shared by every structural method (VIB, the one-shot structured baselines): the same `save`, `export` and `report`
hooks (their common config keys, a params/FLOPs target instead of a sparsity, are prune.structural.config's
`StructuralBudgetConfig`). Saved format, in the run directory's usual two files:
`masks.safetensors` holds per gate `<kind>[.<layer>].keep` (uint8 per unit) and `<kind>[.<layer>].value`
(float32: the multiplier of each kept unit, folded into the weights by the export); `masks.json` holds the
method's metadata and a `structural` section (family, unit counts, kinds, and the count rules).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from prune.core.atomic import write_tensors_with_json
from prune.core.errors import UserInputError
from prune.core.tensor_fit import check_fit
from prune.masks.base import unwrap, wrappers
from prune.masks.storage import CONFIG_FILE, TENSORS_FILE
from prune.structural.config import FFN, HEADS, HIDDEN, LAYERS
from prune.structural.gates import FixedGate, GateSet, UnitGate, attach_unit_gates
from prune.structural.layout import Counts, Structure, structure_of
from prune.structural.shrink import layer_sizes, shrink

FORMAT = "structural-v1"


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
