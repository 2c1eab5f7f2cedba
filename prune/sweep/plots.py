"""The comparison plots (matplotlib, Agg backend: no display needed), each from plain table rows.

- perplexity vs sparsity, one line per method (per model when several); N:M patterns as separate markers at
  their fraction; the dense perplexity as a dashed line; log scale when the values span a decade or more;
- accuracy vs FLOPs, one panel per task, dense included;
- per-layer sparsity of one point (per block, weighted by weights), with the sensitivity scan's per-block
  perplexity increase beneath when there is one;
- the sensitivity ranking as horizontal bars.
Each function returns the path written, or None when the rows hold nothing to plot.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = "osD^v<>ph*"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    models = {row["model"] for row in rows}
    series: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row.get("status") == "done":
            label = row["method"] if len(models) == 1 else f"{row['method']} ({row['model']})"
            series.setdefault((row["model"], label), []).append(row)
    return series


def perplexity_vs_sparsity(rows: list[dict], path: Path) -> Path | None:
    done = [row for row in rows if row.get("status") == "done" and _finite(row.get("perplexity"))]
    if not done:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = [row["perplexity"] for row in done]
    for i, ((model, label), members) in enumerate(_series(done).items()):
        color = f"C{i % 10}"
        fractions = sorted((row for row in members if ":" not in row["sparsity"]), key=lambda row: row["fraction"])
        if fractions:
            ax.plot([100 * row["fraction"] for row in fractions], [row["perplexity"] for row in fractions],
                    marker="o", color=color, label=label)
        for j, row in enumerate(row for row in members if ":" in row["sparsity"]):
            ax.scatter([100 * row["fraction"]], [row["perplexity"]], marker=MARKERS[(j + 2) % len(MARKERS)], s=60,
                       color=color, edgecolors="black", zorder=3, label=f"{label} {row['sparsity']}")
    for j, row in enumerate(row for row in rows if row.get("status") == "dense" and _finite(row.get("perplexity"))):
        values.append(row["perplexity"])
        ax.axhline(row["perplexity"], color="gray", linestyle="--", linewidth=1,
                   label="dense" if len({r["model"] for r in rows}) == 1 else f"dense ({row['model']})")
    if max(values) / max(min(values), 1e-12) >= 10:
        ax.set_yscale("log")
    ax.set_xlabel("sparsity of the pruned layers (%)")
    ax.set_ylabel("held-out perplexity" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title("Perplexity vs sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def accuracy_vs_flops(rows: list[dict], path: Path) -> Path | None:
    tasks = sorted({key.split(".", 1)[1] for row in rows for key in row if key.startswith("accuracy.")
                    and _finite(row[key])})
    points = [row for row in rows if row.get("status") in ("done", "dense") and _finite(row.get("flops.pruned"))]
    if not tasks or not points:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        key = f"accuracy.{task}"
        for i, ((model, label), members) in enumerate(_series(points).items()):
            members = [row for row in members if _finite(row.get(key))]
            ax.scatter([row["flops.pruned"] / 1e9 for row in members], [row[key] for row in members],
                       color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], label=label)
            for row in members:
                ax.annotate(row["sparsity"], (row["flops.pruned"] / 1e9, row[key]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        for row in points:
            if row.get("status") == "dense" and _finite(row.get(key)):
                ax.scatter([row["flops.pruned"] / 1e9], [row[key]], marker="*", s=150, color="black", label="dense")
        ax.set_xlabel("FLOPs per window, sparse-kernel ideal (GFLOPs)")
        ax.set_ylabel(f"{task} accuracy")
        ax.set_title(f"{task}: accuracy vs FLOPs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _block_of(name: str) -> tuple[str, str]:
    """('12', 'self_attn.q_proj') for 'model.layers.12.self_attn.q_proj'; ('-', name) outside numbered blocks."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return part, ".".join(parts[i + 1:]) or name
    return "-", name


def layer_profile(layers: dict[str, dict], path: Path, title: str, sensitivity: list[dict] | None = None) -> Path | None:
    if not layers:
        return None
    blocks: dict[str, list[float]] = {}
    types: dict[str, dict[str, float]] = {}
    for name, info in layers.items():
        block, kind = _block_of(name)
        pruned, total = blocks.setdefault(block, [0.0, 0.0])
        blocks[block] = [pruned + info["sparsity"] * info["weights"], total + info["weights"]]
        types.setdefault(kind, {})[block] = info["sparsity"]
    order = sorted(blocks, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0, b))
    by_block = [entry for entry in (sensitivity or []) if entry.get("kind") == "block"]
    fig, axes = plt.subplots(2 if by_block else 1, 1, figsize=(max(7, 0.3 * len(order) + 3), 7 if by_block else 4),
                             squeeze=False)
    ax = axes[0][0]
    x = range(len(order))
    ax.bar(x, [100 * blocks[b][0] / blocks[b][1] for b in order], color="C0", alpha=0.5, label="block (weighted)")
    for i, (kind, per_block) in enumerate(sorted(types.items())):
        ax.scatter([j for j, b in enumerate(order) if b in per_block], [100 * per_block[b] for b in order if b in per_block],
                   s=12, marker=MARKERS[i % len(MARKERS)], label=kind, zorder=3)
    ax.set_xticks(list(x), order, fontsize=7)
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    if by_block:
        ax = axes[1][0]
        increase = {entry["group"].removeprefix("block "): entry.get("increase") for entry in by_block}
        ax.bar(x, [increase.get(b) if _finite(increase.get(b)) else 0.0 for b in order], color="C3")
        ax.set_xticks(list(x), order, fontsize=7)
        ax.set_xlabel("block pruned alone")
        ax.set_ylabel("perplexity increase")
        ax.set_title("sensitivity: perplexity increase when only this block is pruned")
    return _save(fig, path)


def sensitivity_bars(entries: list[dict], path: Path, title: str) -> Path | None:
    if not entries:
        return None
    kinds = sorted({entry["kind"] for entry in entries})
    heights = [sum(1 for entry in entries if entry["kind"] == kind) for kind in kinds]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(8, 1.5 + 0.28 * sum(heights) + 0.5 * len(kinds)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, kind in zip(axes[:, 0], kinds):
        ranked = [entry for entry in entries if entry["kind"] == kind]
        values = [entry["increase"] if _finite(entry.get("increase")) else math.nan for entry in ranked]
        top = max([v for v in values if _finite(v)], default=1.0)
        labels = [entry["group"] for entry in ranked]
        bars = [v if _finite(v) else top for v in values]
        ax.barh(range(len(ranked)), bars, color=["C3" if _finite(v) else "black" for v in values])
        ax.set_yticks(range(len(ranked)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("perplexity increase over dense (black: NaN/inf)")
        ax.set_title(f"{title} — one {kind} at a time")
    return _save(fig, path)
