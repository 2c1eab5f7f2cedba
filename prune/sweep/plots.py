"""The comparison plots (matplotlib, Agg backend: no display needed), each from plain table rows.

- perplexity vs sparsity, one panel per text (in-domain, then each out-of-domain text), one line per method (per
  model when several), each point with its 95% bootstrap interval; N:M patterns as separate markers at their
  fraction; the dense perplexity as a dashed line; log scale when the values span a decade or more;
- accuracy vs FLOPs, one panel per lm-eval task, dense included, each point with lm-eval's standard error as an error
  bar, on an axis from 0 (a gap of a few points must not look like a collapse);
- per-layer sparsity of one point (per block, weighted by weights), with the sensitivity scan's per-block
  perplexity increase beneath when there is one; not drawn when every layer has the same sparsity and no scan ran
  (a flat bar chart says nothing the table does not);
- the sensitivity ranking as horizontal bars;
- perplexity vs decode ms/token (the speed axis), one panel per text: every point with its interval and its name,
  the Pareto front on that text drawn as a line through its points, the dense model as a black star.
Each function returns the path written, or None when the rows hold nothing to plot.
"""

from __future__ import annotations

import math
from pathlib import Path

from prune.core.figures import is_finite_number, save_figure, subplots

MARKERS = "osD^v<>ph*"
DECODE = "decode_ms_per_token"  # a row's speed axis: the x of the Pareto front (prune.sweep.compare)


def _series(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    models = {row["model"] for row in rows}
    series: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row.get("status") == "done":
            label = row["method"] if len(models) == 1 else f"{row['method']} ({row['model']})"
            series.setdefault((row["model"], label), []).append(row)
    return series


def perplexity_vs_sparsity(rows: list[dict], path: Path, texts: list[tuple[str, str, str]]) -> Path | None:
    """One panel per text, `texts` = [(title, value key, ci95 key)]: the in-domain test part, then each
    out-of-domain text. Every point carries its 95% bootstrap interval as an error bar."""
    panels = [
        text
        for text in texts
        if any(row.get("status") == "done" and is_finite_number(row.get(text[1])) for row in rows)
    ]
    if not panels:
        return None
    fig, axes = subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (title, value, ci95) in zip(axes[0], panels):
        _perplexity_panel(ax, rows, value, ci95, title)
    return save_figure(fig, path)


def _error_bar(row: dict, value: str, ci95: str) -> list[list[float]] | None:
    """matplotlib's yerr for one point: distances from the value down to the interval's low end and up to its high."""
    interval = row.get(ci95)
    if not isinstance(interval, list) or len(interval) != 2:
        return None
    return [[max(0.0, row[value] - interval[0])], [max(0.0, interval[1] - row[value])]]


def _perplexity_panel(ax, rows: list[dict], value: str, ci95: str, title: str) -> None:
    """Each method's points (nudged sideways by a fraction of a percent per method, so that intervals at the same
    level stay apart) with their intervals; the dense value as a dashed line over its interval as a band."""
    done = [row for row in rows if row.get("status") == "done" and is_finite_number(row.get(value))]
    values = [row[value] for row in done]
    series = _series(done)
    for i, ((_model, label), members) in enumerate(series.items()):
        color, nudge = f"C{i % 10}", 0.4 * (i - (len(series) - 1) / 2)
        fractions = sorted((row for row in members if ":" not in row["sparsity"]), key=lambda row: row["fraction"])
        if fractions:
            ax.plot(
                [100 * row["fraction"] + nudge for row in fractions],
                [row[value] for row in fractions],
                marker="o",
                color=color,
                label=label,
            )
        for j, row in enumerate(row for row in members if ":" in row["sparsity"]):
            ax.scatter(
                [100 * row["fraction"] + nudge],
                [row[value]],
                marker=MARKERS[(j + 2) % len(MARKERS)],
                s=60,
                color=color,
                edgecolors="black",
                zorder=3,
                label=f"{label} {row['sparsity']}",
            )
        for row in members:
            bar = _error_bar(row, value, ci95)
            if bar is not None:
                ax.errorbar(
                    [100 * row["fraction"] + nudge], [row[value]], yerr=bar, color=color, capsize=3, linewidth=1
                )
    for row in rows:
        if row.get("status") == "dense" and is_finite_number(row.get(value)):
            values.append(row[value])
            ax.axhline(
                row[value],
                color="gray",
                linestyle="--",
                linewidth=1,
                label="dense" if len({r["model"] for r in rows}) == 1 else f"dense ({row['model']})",
            )
            if isinstance(row.get(ci95), list):
                ax.axhspan(*row[ci95], color="gray", alpha=0.12)
    _perplexity_axes(ax, values, "sparsity of the pruned layers (%)", title)


def _perplexity_axes(ax, values: list[float], xlabel: str, title: str) -> None:
    """Labels, grid and legend of a perplexity panel; a log scale when `values` span a decade or more."""
    if max(values) / max(min(values), 1e-12) >= 10:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test perplexity, 95% CI" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def accuracy_vs_flops(rows: list[dict], path: Path) -> Path | None:
    """One panel per lm-eval task (`accuracy.<task>`): accuracy against FLOPs, each point with its standard error
    (`accuracy_stderr.<task>`) as an error bar where lm-eval gave one, the axis from 0."""
    benchmarks = sorted(
        {
            key.split(".", 1)[1]
            for row in rows
            for key in row
            if key.startswith("accuracy.") and is_finite_number(row[key])
        }
    )
    points = [
        row for row in rows if row.get("status") in ("done", "dense") and is_finite_number(row.get("flops.pruned"))
    ]
    if not benchmarks or not points:
        return None
    fig, axes = subplots(1, len(benchmarks), figsize=(6 * len(benchmarks), 4.5), squeeze=False)
    for ax, benchmark in zip(axes[0], benchmarks):
        key, stderr = f"accuracy.{benchmark}", f"accuracy_stderr.{benchmark}"
        for i, ((_model, label), members) in enumerate(_series(points).items()):
            members = [row for row in members if is_finite_number(row.get(key))]
            color = f"C{i % 10}"
            ax.scatter(
                [row["flops.pruned"] / 1e9 for row in members],
                [row[key] for row in members],
                color=color,
                marker=MARKERS[i % len(MARKERS)],
                label=label,
            )
            for row in members:
                ax.annotate(
                    row["sparsity"],
                    (row["flops.pruned"] / 1e9, row[key]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
                _accuracy_error_bar(ax, row, key, stderr, color)
        for row in points:
            if row.get("status") == "dense" and is_finite_number(row.get(key)):
                ax.scatter([row["flops.pruned"] / 1e9], [row[key]], marker="*", s=150, color="black", label="dense")
                _accuracy_error_bar(ax, row, key, stderr, "black")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("FLOPs per window, sparse-kernel ideal (GFLOPs)")
        ax.set_ylabel(f"{benchmark} accuracy ± stderr")
        ax.set_title(f"{benchmark}: accuracy vs FLOPs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _accuracy_error_bar(ax, row: dict, key: str, stderr: str, color: str) -> None:
    """The point's ± lm-eval standard error, when it has one (a task scored on one example has none)."""
    if is_finite_number(row.get(stderr)):
        ax.errorbar([row["flops.pruned"] / 1e9], [row[key]], yerr=[row[stderr]], color=color, capsize=3, linewidth=1)


def _block_of(name: str) -> tuple[str, str]:
    """('12', 'self_attn.q_proj') for 'model.layers.12.self_attn.q_proj'; ('-', name) outside numbered blocks."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return part, ".".join(parts[i + 1 :]) or name
    return "-", name


UNIFORM = 1e-3  # per-layer sparsities closer than this (0.1 percentage point) are one level: rounding, not a profile


def layer_profile(
    layers: dict[str, dict], path: Path, title: str, sensitivity: list[dict] | None = None
) -> Path | None:
    """Per-block sparsity of one point (and the sensitivity scan's per-block increase beneath); None when there is
    nothing to see: no layers, or every layer at the same sparsity without a scan."""
    by_block = [entry for entry in (sensitivity or []) if entry.get("kind") == "block"]
    levels = [info["sparsity"] for info in layers.values()]
    if not layers or (max(levels) - min(levels) < UNIFORM and not by_block):
        return None
    blocks: dict[str, list[float]] = {}
    types: dict[str, dict[str, float]] = {}
    for name, info in layers.items():
        block, kind = _block_of(name)
        pruned, total = blocks.setdefault(block, [0.0, 0.0])
        blocks[block] = [pruned + info["sparsity"] * info["weights"], total + info["weights"]]
        types.setdefault(kind, {})[block] = info["sparsity"]
    order = sorted(blocks, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0, b))
    fig, axes = subplots(
        2 if by_block else 1, 1, figsize=(max(7, 0.3 * len(order) + 3), 7 if by_block else 4), squeeze=False
    )
    ax = axes[0][0]
    x = range(len(order))
    ax.bar(x, [100 * blocks[b][0] / blocks[b][1] for b in order], color="C0", alpha=0.5, label="block (weighted)")
    for i, (kind, per_block) in enumerate(sorted(types.items())):
        ax.scatter(
            [j for j, b in enumerate(order) if b in per_block],
            [100 * per_block[b] for b in order if b in per_block],
            s=12,
            marker=MARKERS[i % len(MARKERS)],
            label=kind,
            zorder=3,
        )
    ax.set_xticks(list(x), order, fontsize=7)
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    if by_block:
        ax = axes[1][0]
        increase = {entry["group"].removeprefix("block "): entry.get("increase") for entry in by_block}
        ax.bar(x, [increase.get(b) if is_finite_number(increase.get(b)) else 0.0 for b in order], color="C3")
        ax.set_xticks(list(x), order, fontsize=7)
        ax.set_xlabel("block pruned alone")
        ax.set_ylabel("perplexity increase")
        ax.set_title("sensitivity: perplexity increase when only this block is pruned")
    return save_figure(fig, path)


def sensitivity_bars(entries: list[dict], path: Path, title: str) -> Path | None:
    if not entries:
        return None
    kinds = sorted({entry["kind"] for entry in entries})
    heights = [sum(1 for entry in entries if entry["kind"] == kind) for kind in kinds]
    fig, axes = subplots(
        len(kinds),
        1,
        figsize=(8, 1.5 + 0.28 * sum(heights) + 0.5 * len(kinds)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, kind in zip(axes[:, 0], kinds):
        ranked = [entry for entry in entries if entry["kind"] == kind]
        values = [entry["increase"] if is_finite_number(entry.get("increase")) else math.nan for entry in ranked]
        top = max([v for v in values if is_finite_number(v)], default=1.0)
        labels = [entry["group"] for entry in ranked]
        bars = [v if is_finite_number(v) else top for v in values]
        ax.barh(range(len(ranked)), bars, color=["C3" if is_finite_number(v) else "black" for v in values])
        ax.set_yticks(range(len(ranked)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("perplexity increase over dense (black: NaN/inf)")
        ax.set_title(f"{title} — one {kind} at a time")
    return save_figure(fig, path)


def _point_name(row: dict) -> str:
    """A point's name on a plot: its directory's (e.g. teal-40, wanda-0.5); 'dense' for the dense model."""
    return "dense" if row.get("status") == "dense" else Path(row["dir"]).name if row.get("dir") else row["method"]


def perplexity_vs_speed(rows: list[dict], path: Path, texts: list[tuple[str, str, str, str]]) -> Path | None:
    """One panel per text, `texts` = [(title, value key, ci95 key, pareto key)]: test perplexity against decode
    ms/token (log scale when the values span a decade or more); the Pareto front's points joined in order of speed."""
    timed = [row for row in rows if row.get("status") in ("done", "dense") and is_finite_number(row.get(DECODE))]
    panels = [text for text in texts if any(is_finite_number(row.get(text[1])) for row in timed)]
    if not panels:
        return None
    fig, axes = subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (title, value, ci95, pareto) in zip(axes[0], panels):
        points = [row for row in timed if is_finite_number(row.get(value))]
        front = sorted((row for row in points if row.get(pareto)), key=lambda row: row[DECODE])
        ax.plot([row[DECODE] for row in front], [row[value] for row in front], color="C3", label="Pareto front (red)")
        for row in points:
            dense = row["status"] == "dense"
            ax.errorbar(
                [row[DECODE]],
                [row[value]],
                yerr=_error_bar(row, value, ci95),
                marker="*" if dense else "o",
                markersize=14 if dense else 6,
                color="black" if dense else "C3" if row.get(pareto) else "C0",
                capsize=3,
                linewidth=1,
                zorder=3,
                label="dense" if dense else None,
            )
            ax.annotate(
                _point_name(row), (row[DECODE], row[value]), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
        _perplexity_axes(ax, [row[value] for row in points], "decode ms/token, batch 1 (lower is faster)", title)
    return save_figure(fig, path)
