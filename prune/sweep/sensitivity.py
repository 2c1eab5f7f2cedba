"""Layer sensitivity: prune one group of targets at a time (one block, or one layer type such as every q_proj),
everything else dense, and rank the groups by how much perplexity rises.

A ranking is what a user tunes per-layer sparsity with, so it reads the VALIDATION part (its first
`heldout_blocks` windows), never the test part the reported figures come from. Masks come from the sweep's shared
dense statistics (`SharedModel.pruned`), so the scan costs one calibration pass (reused from the sweep when it has
run) plus one perplexity per group.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from eval.metric_errors import NonFiniteError
from eval.perplexity import perplexity
from prune.core.config import MethodConfig
from prune.models.blocks import find_blocks


def groups(model, names: list[str], by: list[str]) -> list[tuple[str, str, list[str]]]:
    """(kind, group, target names): 'block' groups per decoder block, 'type' groups per name after the block
    index (self_attn.q_proj, mlp.down_proj, ...); a target outside the blocks is a group of its own."""
    prefix = find_blocks(model)[0] + "."
    by_block: dict[str, list[str]] = {}
    by_type: dict[str, list[str]] = {}
    for name in names:
        head, _, rest = name[len(prefix) :].partition(".") if name.startswith(prefix) else ("", "", "")
        if head.isdigit():
            by_block.setdefault(f"block {head}", []).append(name)
            by_type.setdefault(rest, []).append(name)
        else:
            by_block.setdefault(name, []).append(name)
            by_type.setdefault(name, []).append(name)
    out = []
    if "block" in by:
        out += [("block", group, members) for group, members in by_block.items()]
    if "type" in by:
        out += [("type", group, members) for group, members in by_type.items()]
    return out


def scan(shared, config: MethodConfig, by: list[str], heldout_blocks: int | None, *, progress: bool = True) -> dict:
    """Perplexity increase per group, ranked (largest first within each kind; NaN/inf ranks first)."""
    start = time.perf_counter()
    model = shared.model
    blocks = shared.splits.validation_blocks(shared.recipe.data.seq_len)
    blocks = blocks[:heldout_blocks] if heldout_blocks else blocks
    dense = perplexity(model, blocks, desc="perplexity (dense)").value
    modules = dict(model.named_modules())
    entries = []
    for kind, group, members in tqdm(
        groups(model, shared.targets(config), by), desc="sensitivity", disable=not progress
    ):
        weights = sum(modules[name].weight.numel() for name in members)
        with shared.pruned(config, members):
            try:
                value = perplexity(model, blocks, desc=f"perplexity ({group})").value
            except NonFiniteError:
                value = None
        entries.append(
            {
                "kind": kind,
                "group": group,
                "targets": len(members),
                "weights": weights,
                "perplexity": value,
                "increase": None if value is None else value - dense,
                "ratio": None if value is None else value / dense,
                "status": "ok" if value is not None else "non-finite",
            }
        )
    entries.sort(key=lambda e: (e["kind"], e["increase"] is not None, -(e["increase"] or 0.0)))
    for kind in {e["kind"] for e in entries}:
        for rank, entry in enumerate((e for e in entries if e["kind"] == kind), 1):
            entry["rank"] = rank
    return {
        "model": shared.recipe.model,
        "method": config.name,
        "sparsity": str(config.pattern),
        "dense_perplexity": dense,
        "validation_tokens": int(blocks.shape[0] * (blocks.shape[1] - 1)),
        "seconds": round(time.perf_counter() - start, 2),
        "entries": entries,
    }


def render_rows(result: dict) -> list[dict]:
    return [
        {
            "rank": e["rank"],
            "kind": e["kind"],
            "group": e["group"],
            "targets": e["targets"],
            "perplexity": "nan/inf" if e["perplexity"] is None else f"{e['perplexity']:.3f}",
            "increase": "nan/inf" if e["increase"] is None else f"{e['increase']:+.3f}",
            "ratio": "-" if e["ratio"] is None else f"{e['ratio']:.3f}",
        }
        for e in result["entries"]
    ]


COLUMNS = ["rank", "kind", "group", "targets", "perplexity", "increase", "ratio"]
