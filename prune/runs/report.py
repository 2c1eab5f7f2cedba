"""report.json, report.md and the terminal table: dense vs pruned side by side, and with recovery the pruned
model before and after it, paired window by window (report.md's note on what was measured comes from the run's
task, prune.tasks)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from eval.bootstrap import paired_bootstrap
from eval.tables import format_number, render_markdown_table, render_table
from prune.core.atomic import write_json_atomic, write_text_atomic
from prune.core.memory import peak_rss_mb
from prune.recovery.config import RecoverConfig
from prune.tasks.data_config import DEFAULT_TASK
from prune.tasks.registry import get_task

if TYPE_CHECKING:  # for the annotations only: the report needs no torch
    from prune.runs.recipe import Recipe
    from prune.training.trainer import TrainResult

COLUMNS = [
    "model",
    "perplexity [95% CI]",
    "accuracy (± stderr)",
    "FLOPs",
    "params (nonzero)",
    "sparsity",
    "latency",
    "time (s)",
]


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """report.json's `timings`: how long `stage` took, in seconds."""
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 2)


def run_report(recipe: Recipe, fields: dict, achieved: float, figures: dict, timings: dict[str, float]) -> dict:
    """report.json's content for one pruned model: the run, the task's fields (a causal LM's data report), the
    target and achieved sparsity, the pruned model's figures (as a task's `measure` returns them), the timings
    and the peak memory. One builder for `prune run` and a sweep's shared points, so their reports match."""
    return {
        "model": recipe.model,
        "method": recipe.method.name,
        **fields,
        "recipe_fingerprint": recipe.fingerprint(),
        "sparsity": {"target": recipe.method.target_label(), "achieved": achieved},
        **{key: value for key, value in figures.items() if key != "seconds"},
        "timings": timings,
        "memory": {"peak_rss_mb": peak_rss_mb()},
    }


def columns(figures: dict) -> list[str]:
    """COLUMNS with one perplexity column per out-of-domain text (`extra_texts`) after the in-domain one."""
    extra = [f"{name} [95% CI]" for name in figures.get("extra_texts", {})]
    return COLUMNS[:2] + extra + COLUMNS[2:]


def perplexity_cell(perplexity: dict) -> str:
    """'12.2 [11.5, 13.0]': the value and its bootstrap interval over windows (the value alone for a perplexity
    measured without one: a report written before intervals)."""
    if "ci95" not in perplexity:
        return format_number(perplexity["value"])
    low, high = perplexity["ci95"]
    return f"{format_number(perplexity['value'])} [{format_number(low)}, {format_number(high)}]"


def _accuracy_cell(figures: dict) -> str:
    stderr = figures.get("accuracy_stderr", {})
    return (
        ", ".join(
            f"{benchmark} {value:.3f}" + (f" ± {stderr[benchmark]:.3f}" if stderr.get(benchmark) is not None else "")
            for benchmark, value in figures.get("accuracy", {}).items()
        )
        or "-"
    )


def summary_row(
    label: str, figures: dict, sparsity: float | None = None, seconds: float | None = None, flops: str = "pruned"
) -> dict:
    """One table row from the figures a task's `measure` returns; `flops` picks dense or pruned FLOPs."""
    latency = figures.get("latency")
    row = {
        "model": label,
        "perplexity [95% CI]": perplexity_cell(figures["perplexity"]) if "perplexity" in figures else "-",
        "accuracy (± stderr)": _accuracy_cell(figures),
        "FLOPs": format_number(figures["flops"][flops]) if "flops" in figures else "-",
        "params (nonzero)": format_number(figures["params"]["nonzero"]),
        "sparsity": "-" if sparsity is None else f"{sparsity:.1%}",
        "latency": f"{latency['decode_ms_per_token']:.1f} ms/tok" if latency else "-",
        "time (s)": f"{seconds if seconds is not None else figures['seconds']:.0f}",
    }
    for name, text in figures.get("extra_texts", {}).items():
        row[f"{name} [95% CI]"] = perplexity_cell(text["perplexity"])
    return row


RECOVERY_STAGES = ("recover", "recovered_eval")  # timings of recovery, which the row before it does not count


def summary_rows(report: dict) -> list[dict]:
    """One row for the dense baseline (when measured) and one for the pruned model; with recovery, the pruned
    model before it and then after it (the model the run saved)."""
    rows = []
    if "dense" in report:
        rows.append(summary_row("dense", report["dense"], flops="dense"))
    pruned_time = sum(seconds for stage, seconds in report["timings"].items() if stage != "dense_eval")
    label = f"{report['method']} {report['sparsity']['target']}"
    achieved = report["sparsity"]["achieved"]
    if "recover" in report:
        before_time = pruned_time - sum(report["timings"].get(stage, 0.0) for stage in RECOVERY_STAGES)
        rows.append(summary_row(label, report["recover"]["before"], achieved, before_time))
        label = f"{label} + recovery ({report['recover']['mode']})"
    rows.append(summary_row(label, report, achieved, pruned_time))
    return rows


def training_section(result: TrainResult, metric: str, unit: str, per_step: int) -> dict:
    """A training stage's figures in report.json (`train`; `recover` beside its own): its steps, the tokens (images)
    it read, all processes together (`<unit>_seen`; `per_step`: one optimizer step's), the step of its best
    periodic evaluation and that score, its seconds and processes. One builder for both stages."""
    return {
        "steps": result.steps,
        f"{unit}_seen": result.steps * per_step,
        "best_step": result.best_step,
        f"best_eval_{metric}": result.best_score,
        "seconds": round(result.seconds, 2),
        "processes": result.processes,
    }


def recovery_section(config: RecoverConfig, training: dict, before: dict, after: dict) -> dict:
    """report.json's `recover`: the mode and the stage's `training_section`, the figures before recovery (`before`;
    the report's own figures are after it), and per text the paired bootstrap of ppl_after / ppl_before over the
    same test windows (`paired.<text>`: ratio, ci95, verdict better / worse / not distinguishable). Accuracy has no
    per-example record to pair: compare its values with their standard errors."""
    section = {
        "mode": config.mode,
        **training,
        "before": {key: value for key, value in before.items() if key != "seconds"},
    }
    texts = {"perplexity": (before.get("perplexity"), after.get("perplexity"))}
    for name, figures in after.get("extra_texts", {}).items():
        texts[name] = (before.get("extra_texts", {}).get(name, {}).get("perplexity"), figures["perplexity"])
    paired = {}
    for name, (was, now) in texts.items():
        if was is None or now is None:
            continue
        windows = len(now["window_nll"])
        comparison = paired_bootstrap(now["window_nll"], was["window_nll"], [now["tokens"] / windows] * windows)
        paired[name] = {
            "ratio": comparison.ratio,
            "ci95": [comparison.low, comparison.high],
            "verdict": comparison.verdict(),
        }
    if paired:
        section["paired"] = paired
    return section


def _recovery_note(report: dict) -> str:
    """report.md's sentence on recovery: what trained, which step was kept, and each text's paired verdict."""
    recovery = report.get("recover")
    if recovery is None:
        return ""
    best = recovery["best_step"]
    kept = f"the best validation step ({best})" if best is not None else "the last step"
    verdicts = "; ".join(
        f"{'test part' if name == 'perplexity' else name} {entry['ratio']:.3f}x "
        f"[{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}], {entry['verdict']}"
        for name, entry in recovery.get("paired", {}).items()
    )
    note = f" Recovery ({recovery['mode']}, {recovery['steps']} steps) kept {kept}."
    if verdicts:
        note += f" Perplexity after / before recovery, paired over the same windows: {verdicts}."
    return note


def render(report: dict) -> str:
    return render_table(summary_rows(report), columns(report))


def _kernel_note(report: dict) -> str:
    """PyTorch's 2:4 kernels: the measured speed-up, or why they could not run (never a made-up number)."""
    kernel = report.get("semi_structured_kernel")
    if kernel is None:
        return ""
    if not kernel["available"]:
        return f" 2:4 sparse kernel: unavailable ({kernel['reason']})."
    return (
        f" 2:4 sparse kernel ({kernel['layers']} linears, {kernel['dtype']}, batch {kernel['batch']} x "
        f"{kernel['seq_len']}): prefill {kernel['dense_ms']:.1f} ms dense vs {kernel['sparse_ms']:.1f} ms sparse, "
        f"{kernel['speedup']:.2f}x."
    )


def write_report(directory: Path, report: dict) -> None:
    """report.md first, report.json last: report.json present means the run finished."""
    warning = report.get("data", {}).get("warning")
    markdown = [
        f"# {report['method']} {report['sparsity']['target']} on {report['model']}",
        "",
        *([f"**Warning:** {warning}", ""] if warning else []),
        render_markdown_table(summary_rows(report), columns(report)),
        "",
        get_task(report.get("task", DEFAULT_TASK)).note(report)
        + _recovery_note(report)
        + _kernel_note(report)
        + " Timings (s): "
        + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in report["timings"].items()),
        "",
    ]
    write_text_atomic(directory / "report.md", "\n".join(markdown))
    write_json_atomic(directory / "report.json", report)


def with_dense(report: dict, dense: dict) -> dict:
    """The dense figures under `dense`, and each dense perplexity beside the pruned one (`perplexity.dense`,
    `extra_texts.<name>.perplexity.dense`)."""
    report["dense"] = dict(dense)
    if "perplexity" in dense and "perplexity" in report:
        report["perplexity"]["dense"] = dense["perplexity"]["value"]
    for name, figures in report.get("extra_texts", {}).items():
        if name in dense.get("extra_texts", {}):
            figures["perplexity"]["dense"] = dense["extra_texts"][name]["perplexity"]["value"]
    return report
