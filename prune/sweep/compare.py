"""The comparison table: one row per point (and one per dense baseline), from report.json files.

Used by `prune sweep` (as points finish and at the end) and `prune compare RUN_DIR ...` (from existing runs).
A row is flat: every figure of a report under its dotted key (`perplexity`, `accuracy.<task>`, `flops.pruned`,
`params.nonzero`, `latency.decode_ms_per_token`, `timings.<stage>`, `memory.peak_rss_mb`, ...), plus `model`,
`method`, `sparsity` (the target as written: 0.5, 2:4), `fraction` (the share removed), `achieved`, `status`
(dense | done | skipped | failed), `reason`, `best` and `dir`. The best point of each level (per model) has the
lowest perplexity (the highest mean accuracy when perplexity was not measured).

Whether "best" means anything: for each text (the in-domain test part as `verdict`, each out-of-domain text as
`extra_texts.<name>.verdict`) every point of a level is compared with that level's best by a paired bootstrap
over the same test windows (`eval.bootstrap`, per-window NLLs from report.json, fixed seed): "best", "not
distinguishable from best" (the interval of ppl / ppl_best holds 1) or "worse".

With a sweep's speed axis (prune.sweep.speed) the rows also hold `decode_ms_per_token`, `prefill_tokens_per_s`,
`decode_speedup`, `prefill_speedup` (over the dense model timed in the same rounds) and `model_bytes`, and per
text a Pareto flag (`pareto`; `extra_texts.<name>.pareto`): no other row of the model, dense included, decodes
faster AND reads a lower test perplexity on that text.

`prune compare` refuses runs of one model scored on other test windows (another seq_len, text or split): no best,
verdict or shared axis means anything across them (check_same_windows).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from eval.bootstrap import BEST, verdicts_against_best
from eval.tables import format_number, render_markdown_table, render_table
from prune.core.atomic import write_json_atomic, write_text_atomic
from prune.core.errors import UserInputError
from prune.core.extras import require
from prune.core.sparsity import parse_sparsity
from prune.data.seen import NOT_SEEN, SEEN
from prune.sweep import output_dir, plots
from prune.sweep.output_dir import OutputKind
from prune.sweep.plots import DECODE

REPORT = "report.json"
# what write_outputs may draw
PLOTS = ("perplexity_vs_sparsity.png", "accuracy_vs_flops.png", "layers.png", "perplexity_vs_speed.png")
COMPARISON = OutputKind(
    ".maskprune-compare",
    "comparison",
    "prune compare",
    frozenset({"compare.csv", "compare.json", "compare.md", *PLOTS}),
)
FRONT = [
    "model",
    "method",
    "sparsity",
    "fraction",
    "achieved",
    "status",
    "best",
    "verdict",
    "perplexity",
    "perplexity.ci95",
    "perplexity.dense",
]
NOT_PAIRED = "not paired: other test windows"
SEEN_SHORT = "seen"  # a table cell's short form of SEEN; the table's note spells it out
LEGEND = (
    f"`({SEEN_SHORT})`: {SEEN}, i.e. that run's calibration, training or choice of the best masks read parts "
    f"of that text (data.source, data.mix; never its test part); `({NOT_SEEN})`: no part of it. An "
    f"out-of-domain figure means something only on a text {NOT_SEEN}."
)
RANKED = (  # what sweep.md says of its bold figures and verdicts (when a level has rivals)
    "Bold: the lowest of its level. `vs best`: a paired bootstrap over the same windows against the level's best "
    "(2000 resamples, fixed seed): `worse` when the whole 95% interval of ppl / ppl_best lies above 1, else `not "
    "distinguishable from best`. "
)
_WINDOW_NLL = ".window_nll"  # per-window NLLs: in the rows (to pair them) and sweep.json, not in the CSV
_SKIP = ("dense", "layer_sparsity", "sweep", "config")
_PER_LAYER = "activation.layers."  # per-layer figures stay in report.json, like layer_sparsity


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def removed_fraction(target: str, achieved: float | None) -> float | None:
    """The share removed: a sparsity level's (0.5, 2:4), else, for a target of another kind (`params 0.3`,
    `6 blocks`, `teal 0.4`), the share the run achieved (None for a point that did not run)."""
    try:
        return parse_sparsity(target).removed_fraction
    except UserInputError:
        return achieved


def report_row(report: dict, directory: Path | str | None = None) -> dict:
    sweep = report.get("sweep", {})
    target = str(report["sparsity"]["target"])
    flat = _flatten({key: value for key, value in report.items() if key not in _SKIP})
    flat = {key: value for key, value in flat.items() if not key.startswith(_PER_LAYER)}
    for key in ("model", "method", "sparsity.target", "sparsity.achieved", "recipe_fingerprint"):
        flat.pop(key, None)
    row = {
        "model": report["model"],
        "method": sweep.get("method_label", report["method"]),
        "sparsity": target,
        "fraction": removed_fraction(target, report["sparsity"]["achieved"]),
        "achieved": report["sparsity"]["achieved"],
        "status": "done",
        "best": False,
        "reason": "",
        "path": sweep.get("path", "run"),
        "dir": str(directory) if directory is not None else "",
        "time_s": round(sum(v for k, v in report.get("timings", {}).items() if k != "dense_eval"), 2),
    }
    if "perplexity.value" in flat:
        flat["perplexity"] = flat.pop("perplexity.value")
    row.update(flat)
    return row


def dense_row(model: str, figures: dict) -> dict:
    flat = _flatten({key: value for key, value in figures.items() if key != "seconds"})
    if "perplexity.value" in flat:
        flat["perplexity"] = flat.pop("perplexity.value")
    row = {
        "model": model,
        "method": "dense",
        "sparsity": "0",
        "fraction": 0.0,
        "achieved": 0.0,
        "status": "dense",
        "best": False,
        "reason": "",
        "path": "",
        "dir": "",
        "time_s": round(figures.get("seconds", 0.0), 2),
    }
    if "flops.dense" in flat:
        flat["flops.pruned"] = flat["flops.dense"]
    row.update(flat)
    return row


def skipped_row(model: str, method: str, sparsity: str, reason: str, status: str = "skipped", directory="") -> dict:
    return {
        "model": model,
        "method": method,
        "sparsity": sparsity,
        "fraction": removed_fraction(sparsity, None),
        "achieved": None,
        "status": status,
        "best": False,
        "reason": reason,
        "path": "",
        "dir": str(directory),
    }


def _mean_accuracy(row: dict) -> float | None:
    values = [value for key, value in row.items() if key.startswith("accuracy.") and isinstance(value, (int, float))]
    return sum(values) / len(values) if values else None


def mark_best(rows: list[dict]) -> list[dict]:
    """Set `best` on the lowest-perplexity (else highest-accuracy) done row of each (model, level)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        row["best"] = False
        if row["status"] == "done":
            groups.setdefault((row["model"], row["sparsity"]), []).append(row)
    for members in groups.values():
        scored = [(row["perplexity"], row) for row in members if isinstance(row.get("perplexity"), (int, float))]
        if scored:
            min(scored, key=lambda item: item[0])[1]["best"] = True
            continue
        scored = [(_mean_accuracy(row), row) for row in members if _mean_accuracy(row) is not None]
        if scored:
            max(scored, key=lambda item: item[0])[1]["best"] = True
    return rows


def extra_texts_of(rows: list[dict]) -> list[str]:
    """The out-of-domain texts any row measured, in first-seen order (names may hold dots: they are file paths)."""
    head, tail = "extra_texts.", ".perplexity.value"
    return list(
        dict.fromkeys(
            key[len(head) : -len(tail)] for row in rows for key in row if key.startswith(head) and key.endswith(tail)
        )
    )


def text_keys(name: str | None) -> dict[str, str]:
    """A row's keys for one text's perplexity: the in-domain test part (None) or the extra text `name`."""
    if name is None:
        return {
            "value": "perplexity",
            "ci95": "perplexity.ci95",
            "nll": "perplexity.window_nll",
            "tokens": "perplexity.tokens",
            "verdict": "verdict",
            "pareto": "pareto",
            "range": "data.splits.test",
            "source": "data.source",
        }
    prefix = f"extra_texts.{name}."
    return {
        "value": f"{prefix}perplexity.value",
        "ci95": f"{prefix}perplexity.ci95",
        "nll": f"{prefix}perplexity.window_nll",
        "tokens": f"{prefix}perplexity.tokens",
        "verdict": f"{prefix}verdict",
        "pareto": f"{prefix}pareto",
        "range": f"data.{prefix}splits.test",
    }


def seen_of(row: dict, name: str | None) -> bool | None:
    """Whether the row's run read the text `name` (None: its in-domain source), from report.json's `data.seen`
    (prune.data.seen); None for the dense baseline and reports written before the label."""
    text = row.get("data.source") if name is None else name
    return row.get(f"data.seen.{text}")


def _windows(row: dict, keys: dict[str, str]) -> tuple:
    """What makes two rows' windows the same ones: the source, the test range, the tokens and window count."""
    source = row.get(keys["source"]) if "source" in keys else None  # an extra text's name is in its keys already
    return (source, tuple(row.get(keys["range"]) or ()), row.get(keys["tokens"]), len(row[keys["nll"]]))


def _test_windows(row: dict, name: str | None) -> tuple | None:
    """What the row's perplexity on one text (None: in-domain) was scored on: the text, seq_len, the test part's
    token range and its windows; None when the row has no perplexity on that text."""
    keys, prefix = text_keys(name), "perplexity." if name is None else f"extra_texts.{name}.perplexity."
    if not isinstance(row.get(keys["value"]), (int, float)):
        return None
    source = row.get("data.source") if name is None else name
    test = tuple(row.get(keys["range"]) or ())
    return source, row.get(f"{prefix}seq_len"), test, row.get(keys["tokens"]), row.get(f"{prefix}windows")


def _describe_windows(windows: tuple) -> str:
    source, seq_len, test, tokens, count = windows
    where = f"test tokens [{test[0]}, {test[1]})" if len(test) == 2 else "test part"
    return f"{source}, seq_len {seq_len}, {where}, {count} windows, {tokens} tokens"


def check_same_windows(rows: list[dict]) -> None:
    """Refuse runs of one model whose perplexity on a text was scored on other test windows than another run's:
    ranking them (the bold best, the paired verdicts, one plot) would compare numbers of different things."""
    for name in [None, *extra_texts_of(rows)]:
        first: dict[str, tuple[tuple, dict]] = {}
        for row in rows:
            windows = _test_windows(row, name) if row["status"] == "done" else None
            if windows is None:
                continue
            seen, other = first.setdefault(row["model"], (windows, row))
            if windows != seen:
                text = "the in-domain text" if name is None else name
                raise UserInputError(
                    f"runs of {row['model']} were scored on other test windows ({text}): {other['dir']}: "
                    f"{_describe_windows(seen)}; {row['dir']}: {_describe_windows(windows)}. A best point or a "
                    "verdict across them would compare different things; compare runs measured alike (same "
                    "data.source, split and seq_len), or each set in its own `prune compare`."
                )


def mark_verdicts(rows: list[dict]) -> list[dict]:
    """For each text, each done row's paired bootstrap verdict against the best of its (model, level). Rows scored
    on other windows than that best cannot be paired and say so; rows without per-window NLLs get no verdict."""
    for name in [None, *extra_texts_of(rows)]:
        keys = text_keys(name)
        groups: dict[tuple, list[dict]] = {}
        for row in rows:
            row.pop(keys["verdict"], None)
            if (
                row["status"] == "done"
                and isinstance(row.get(keys["value"]), (int, float))
                and isinstance(row.get(keys["nll"]), list)
            ):
                groups.setdefault((row["model"], row["sparsity"]), []).append(row)
        for members in groups.values():
            windows = _windows(min(members, key=lambda row: row[keys["value"]]), keys)
            paired = [row for row in members if _windows(row, keys) == windows]
            per_window = windows[2] / windows[3]
            words = verdicts_against_best(
                {index: row[keys["nll"]] for index, row in enumerate(paired)}, [per_window] * windows[3]
            )
            for index, row in enumerate(paired):
                row[keys["verdict"]] = words[index]
            for row in members:
                row.setdefault(keys["verdict"], NOT_PAIRED)
    return rows


def on_front(points: list[tuple[float, float]]) -> list[bool]:
    """Per (decode ms/token, perplexity) pair, whether it is on the Pareto front: no other pair is both faster
    (lower ms) and better (lower perplexity)."""
    return [not any(ms < own_ms and ppl < own_ppl for ms, ppl in points) for own_ms, own_ppl in points]


def mark_pareto(rows: list[dict]) -> list[dict]:
    """For each text, the Pareto flag of every done or dense row with a decode time and a perplexity there,
    against the other such rows of its model (see the module docstring)."""
    for name in [None, *extra_texts_of(rows)]:
        keys = text_keys(name)
        groups: dict[str, list[dict]] = {}
        for row in rows:
            row.pop(keys["pareto"], None)
            if row["status"] in ("done", "dense") and all(
                isinstance(row.get(key), (int, float)) for key in (DECODE, keys["value"])
            ):
                groups.setdefault(row["model"], []).append(row)
        for members in groups.values():
            flags = on_front([(row[DECODE], row[keys["value"]]) for row in members])
            for row, flag in zip(members, flags):
                row[keys["pareto"]] = flag
    return rows


def sort_rows(rows: list[dict], method_order: list[str] | None = None) -> list[dict]:
    models = list(dict.fromkeys(row["model"] for row in rows))
    methods = list(dict.fromkeys((method_order or []) + [row["method"] for row in rows]))
    return sorted(
        rows,
        key=lambda row: (
            models.index(row["model"]),
            row["status"] != "dense",
            math.inf if row["fraction"] is None else row["fraction"],
            ":" in row["sparsity"],
            row["sparsity"],
            methods.index(row["method"]),
        ),
    )


def best_row(rows: list[dict]) -> dict | None:
    """The best point of the most aggressive level any point finished (for the per-layer plot)."""
    best = [row for row in rows if row.get("best")]
    return max(best, key=lambda row: (row["fraction"], ":" not in row["sparsity"]), default=None)


# ---- display -------------------------------------------------------------------------------------------------


SPEED_COLUMNS = ["decode ms/tok", "prefill tok/s", "on disk", "Pareto front"]


def display_columns(
    tasks: list[str], multi_model: bool, best: bool = True, texts: list[str] = (), speed: bool = False
) -> list[str]:
    """The table's columns; `best` adds the paired verdicts (known once a level is complete), `texts` are the
    out-of-domain texts, `speed` the speed axis."""
    columns = (["model"] if multi_model else []) + ["method", "sparsity", "achieved", "perplexity [95% CI]", "x dense"]
    columns += ["vs best"] if best else []
    for name in texts:
        columns += [f"{name} [95% CI]"] + ([f"{name} vs best"] if best else [])
    columns += [f"acc {task}" for task in tasks] + ["FLOPs", "nonzero", "latency"]
    return columns + (SPEED_COLUMNS if speed else []) + ["time (s)", "peak MB", "notes"]


def tasks_of(rows: list[dict]) -> list[str]:
    return sorted({key.split(".", 1)[1] for row in rows for key in row if key.startswith("accuracy.")})


def _short(text: str, limit: int = 110) -> str:
    """A one-line cell: the first `limit` characters of a (possibly long) reason; the files keep it whole."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _perplexity_cell(row: dict, name: str | None) -> str:
    """'12.2 [11.5, 13.0] (not seen)': the value, its interval (absent in a report from before intervals) and
    whether the run read that text (absent for the dense baseline)."""
    keys = text_keys(name)
    value, interval = row.get(keys["value"]), row.get(keys["ci95"])
    if value is None:
        return "-"
    cell = format_number(value)
    if isinstance(interval, list):
        cell += f" [{format_number(interval[0])}, {format_number(interval[1])}]"
    seen = seen_of(row, name)
    return cell if seen is None else f"{cell} ({SEEN_SHORT if seen else NOT_SEEN})"


def _accuracy_cell(value, stderr) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if isinstance(stderr, (int, float)) else "")


def display_row(row: dict, dense_ppl: float | None = None) -> dict[str, str]:
    ppl = row.get("perplexity")
    dense_ppl = row.get("perplexity.dense", dense_ppl)
    latency = row.get("latency.decode_ms_per_token")
    cells = {
        "model": row["model"],
        "method": row["method"],
        "sparsity": row["sparsity"],
        "achieved": "-" if row.get("achieved") is None else f"{row['achieved']:.1%}",
        "perplexity [95% CI]": _perplexity_cell(row, None),
        "x dense": f"{ppl / dense_ppl:.2f}" if ppl is not None and dense_ppl and row["status"] == "done" else "-",
        "vs best": row.get("verdict") or (BEST if row.get("best") else ""),
        "FLOPs": format_number(row["flops.pruned"], kind="flops") if row.get("flops.pruned") is not None else "-",
        "nonzero": format_number(row["params.nonzero"], kind="params")
        if row.get("params.nonzero") is not None
        else "-",
        "latency": f"{latency:.1f} ms/tok" if latency is not None else "-",
        "time (s)": f"{row['time_s']:.0f}" if row.get("time_s") is not None else "-",
        "peak MB": f"{row['memory.peak_rss_mb']:.0f}" if row.get("memory.peak_rss_mb") is not None else "-",
        "notes": _short(row.get("reason") or ("" if row["status"] in ("done", "dense") else row["status"])),
    }
    if row["status"] == "done" and row.get("path") == "pipeline":
        cells["notes"] = "pipeline run"
    for key, value in row.items():
        if key.startswith("accuracy."):
            task = key.split(".", 1)[1]
            cells[f"acc {task}"] = _accuracy_cell(value, row.get(f"accuracy_stderr.{task}"))
    for name in extra_texts_of([row]):
        cells[f"{name} [95% CI]"] = _perplexity_cell(row, name)
        cells[f"{name} vs best"] = row.get(text_keys(name)["verdict"], "")
    cells.update(_speed_cells(row))
    return cells


def _speed_cells(row: dict) -> dict[str, str]:
    """'61.2 (1.22x)' decode ms/token with the speedup over dense, prefill tokens/s, MB on disk, and the texts on
    whose Pareto front the row lies ('-' on none)."""
    if not isinstance(row.get(DECODE), (int, float)):
        return {}
    fronts = [
        "in-domain" if name is None else name
        for name in [None, *extra_texts_of([row])]
        if row.get(text_keys(name)["pareto"])
    ]
    return {
        "decode ms/tok": f"{row[DECODE]:.1f} ({row['decode_speedup']:.2f}x)",
        "prefill tok/s": f"{row['prefill_tokens_per_s']:.0f}",
        "on disk": f"{format_number(row['model_bytes'], kind='si')}B",
        "Pareto front": ", ".join(fronts) or "-",
    }


class LiveTable:
    """Prints a header once, then one aligned line per finished row (through `write`, e.g. tqdm.write)."""

    def __init__(self, columns: list[str], write: Callable[[str], None] = print):
        self.columns, self.write, self.started = columns, write, False
        self.widths = {c: max(len(c), {"method": 12, "model": 14, "sparsity": 8}.get(c, 7)) for c in columns}

    def row(self, cells: dict[str, str]) -> None:
        if not self.started:
            self.write(self._line({c: c for c in self.columns}))
            self.write(self._line({c: "-" * self.widths[c] for c in self.columns}))
            self.started = True
        self.write(self._line(cells))

    def _line(self, cells: dict[str, str]) -> str:
        return "  ".join(str(cells.get(c, "-")).ljust(self.widths[c]) for c in self.columns).rstrip()


def _dense_ppl(rows: list[dict], model: str) -> float | None:
    return next((row.get("perplexity") for row in rows if row["status"] == "dense" and row["model"] == model), None)


def compared(rows: list[dict]) -> bool:
    """Whether any level (per model) has two done rows: else no row has a rival, and `best` says nothing (a
    sweep of listed points, each its own level)."""
    levels = [(row["model"], row["sparsity"]) for row in rows if row["status"] == "done"]
    return len(set(levels)) < len(levels)


def render(rows: list[dict], markdown: bool = False) -> str:
    multi = len({row["model"] for row in rows}) > 1
    speed = any(DECODE in row for row in rows)
    best = compared(rows)
    columns = display_columns(tasks_of(rows), multi, best=best, texts=extra_texts_of(rows), speed=speed)
    cells = [display_row(row, _dense_ppl(rows, row["model"])) for row in rows]
    if markdown and best:
        for cell, row in zip(cells, rows):
            if row.get("best"):
                cell["perplexity [95% CI]"] = f"**{cell['perplexity [95% CI]']}**"
    return (render_markdown_table if markdown else render_table)(cells, columns)


# ---- files ---------------------------------------------------------------------------------------------------


def csv_text(rows: list[dict], front: list[str] = FRONT, tail: list[str] = ("reason", "path", "dir")) -> str:
    """CSV with `front` columns first, then every other key sorted, then `tail`."""
    found = {key for row in rows for key in row if not key.endswith(_WINDOW_NLL)}
    keys = list(dict.fromkeys(list(front) + sorted(found - set(front) - set(tail)) + list(tail)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row.get(key) for key in keys})
    return buffer.getvalue()


def _report_of(row: dict) -> dict | None:
    path = Path(row["dir"]) / REPORT if row.get("dir") else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def write_outputs(
    directory: Path, rows: list[dict], *, title: str, notes: list[str], meta: dict, name: str = "sweep"
) -> dict[str, Path]:
    """<name>.csv/.json/.md and the plots; returns what was written (plots with nothing to show are left out)."""
    from prune.sweep.shared import layers_from_masks

    directory = Path(directory)
    written = {
        "csv": write_text_atomic(directory / f"{name}.csv", csv_text(rows)),
        "json": write_json_atomic(directory / f"{name}.json", {**meta, "rows": rows}),
    }
    texts = [("in-domain test part", "perplexity", "perplexity.ci95")]
    texts += [
        (_plot_label(rows, name), text_keys(name)["value"], text_keys(name)["ci95"]) for name in extra_texts_of(rows)
    ]
    figures = {
        "perplexity": plots.perplexity_vs_sparsity(rows, directory / PLOTS[0], texts),
        "accuracy": plots.accuracy_vs_flops(rows, directory / PLOTS[1]),
    }
    speed = any(DECODE in row for row in rows)
    if speed:
        paretos = [text_keys(name)["pareto"] for name in [None, *extra_texts_of(rows)]]
        speed_texts = [(*text, pareto) for text, pareto in zip(texts, paretos)]
        figures["speed"] = plots.perplexity_vs_speed(rows, directory / PLOTS[3], speed_texts)
    best = best_row(rows)
    if best is not None:
        report = _report_of(best) or {}
        layers = report.get("layer_sparsity") or (layers_from_masks(Path(best["dir"])) if best.get("dir") else None)
        sensitivity_file = directory / "sensitivity" / "sensitivity.json"
        sensitivity = json.loads(sensitivity_file.read_text())["entries"] if sensitivity_file.is_file() else None
        figures["layers"] = plots.layer_profile(
            layers or {},
            directory / PLOTS[2],
            f"per-layer sparsity of the best {best['sparsity']} point: {best['method']} ({best['model']})",
            sensitivity,
        )
    written.update({key: path for key, path in figures.items() if path is not None})
    lines = [
        f"# {title}",
        "",
        render(rows, markdown=True),
        "",
        "Perplexity: the test part of each text, [95% CI] from a bootstrap over its windows. "
        + (RANKED if compared(rows) else "")
        + "`x dense`: perplexity over the dense model's. Accuracy ± lm-eval's standard error. FLOPs: one forward "
        "of one window, sparse-kernel ideal. Time: pruning + evaluating the point. " + LEGEND,
        "",
    ]
    if speed:
        lines[-1:] = [
            "Speed: decode ms/token (its speedup over the dense model) and prefill tokens/s at batch 1, every "
            "model timed in turn in one process (medians over rounds); on disk: the saved model's safetensors "
            "(a model rebuilt from the base model, such as activation sparsity's, counts the base model and its "
            "own files). Pareto front: the texts on which no other row, dense included, decodes faster with a "
            "lower test perplexity.",
            "",
        ]
    lines += [f"- {note}" for note in notes]
    plots_md = [f"![{key}]({path.name})" for key, path in written.items() if path.suffix == ".png"]
    lines += [""] + plots_md + [""]
    written["md"] = write_text_atomic(directory / f"{name}.md", "\n".join(lines))
    return written


def _plot_label(rows: list[dict], name: str) -> str:
    """A plot's legend for the text `name`, with the runs' label when they agree (or saying they differ)."""
    labels = {seen_of(row, name) for row in rows if row["status"] == "done"} - {None}
    if len(labels) == 2:
        return f"{name}: test part ({SEEN} by some runs)"
    return f"{name}: test part" + (f" ({SEEN if labels.pop() else NOT_SEEN})" if labels else "")


def rows_from_runs(run_dirs: list[str | Path]) -> list[dict]:
    """Rows of existing run directories (a sweep directory stands for all its finished points); a dense row per
    model from the first report that measured the dense baseline."""
    rows, dense_seen, seen = [], set(), set()
    for given in run_dirs:
        directory = Path(given)
        if (directory / REPORT).is_file():
            reports = [(directory, directory / REPORT)]
        elif (directory / "sweep.json").is_file():
            reports = [(path.parent, path) for path in sorted((directory / "points").glob(f"*/{REPORT}"))]
        else:
            raise UserInputError(
                f"{directory} has no {REPORT} (nor sweep.json): it is not a finished run; pass directories written by "
                "`prune run` or `prune sweep` (an unfinished run has no report.json yet)."
            )
        for run, path in reports:
            if os.path.realpath(run) in seen:  # one run, however it is spelled (RUN and RUN/) or reached
                continue
            seen.add(os.path.realpath(run))
            try:
                report = json.loads(path.read_text())
                row = report_row(report, run)
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise UserInputError(f"{path} is not a MaskPrune report ({error!r}); rerun that run.") from None
            if "dense" in report and report["model"] not in dense_seen:
                dense_seen.add(report["model"])
                rows.append(dense_row(report["model"], report["dense"]))
            rows.append(row)
    if not rows:
        raise UserInputError(f"no finished runs in {', '.join(map(str, run_dirs))}.")
    check_same_windows(rows)
    return mark_verdicts(mark_best(sort_rows(rows)))


def compare(
    run_dirs: list[str | Path], output: str | Path, *, overwrite: bool = False
) -> tuple[list[dict], dict[str, Path]]:
    """The comparison table and plots of finished runs, written to `output` under the rules of a run directory
    (prune.sweep.output_dir): the runs are read first, so bad input leaves the output untouched."""
    require("matplotlib", "prune compare's plots (perplexity_vs_sparsity.png, accuracy_vs_flops.png)")
    rows = rows_from_runs(run_dirs)
    output_dir.claim(Path(output), COMPARISON, overwrite=overwrite)
    written = write_outputs(
        Path(output),
        rows,
        title="Comparison of runs",
        name="compare",
        notes=[f"runs: {', '.join(map(str, run_dirs))}"],
        meta={"runs": [str(d) for d in run_dirs]},
    )
    return rows, written
