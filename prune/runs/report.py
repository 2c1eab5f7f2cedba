"""report.json, report.md and the terminal table: dense vs pruned side by side."""
from __future__ import annotations

from pathlib import Path

from eval.tables import format_number, render_markdown_table, render_table
from prune.core.atomic import write_json_atomic, write_text_atomic

COLUMNS = ["model", "perplexity [95% CI]", "accuracy (± stderr)", "FLOPs", "params (nonzero)", "sparsity", "latency",
           "time (s)"]


def columns(figures: dict) -> list[str]:
    """COLUMNS with one perplexity column per out-of-domain text (`extra_texts`) after the in-domain one."""
    extra = [f"{name} [95% CI]" for name in figures.get("extra_texts", {})]
    return COLUMNS[:2] + extra + COLUMNS[2:]


def perplexity_cell(perplexity: dict) -> str:
    """'12.2 [11.5, 13.0]': the value and its bootstrap interval over windows."""
    low, high = perplexity["ci95"]
    return f"{format_number(perplexity['value'])} [{format_number(low)}, {format_number(high)}]"


def _accuracy_cell(figures: dict) -> str:
    stderr = figures.get("accuracy_stderr", {})
    return ", ".join(f"{task} {value:.3f}" + (f" ± {stderr[task]:.3f}" if stderr.get(task) is not None else "")
                     for task, value in figures.get("accuracy", {}).items()) or "-"


def summary_row(
    label: str, figures: dict, sparsity: float | None = None, seconds: float | None = None, flops: str = "pruned"
) -> dict:
    """One table row from the figures `prune.tasks.causal_lm.measure` returns; `flops` picks dense or pruned FLOPs."""
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


def summary_rows(report: dict) -> list[dict]:
    """One row for the dense baseline (when measured) and one for the pruned model."""
    rows = []
    if "dense" in report:
        rows.append(summary_row("dense", report["dense"], flops="dense"))
    pruned_time = sum(seconds for stage, seconds in report["timings"].items() if stage != "dense_eval")
    label = f"{report['method']} {report['sparsity']['target']}"
    rows.append(summary_row(label, report, report["sparsity"]["achieved"], pruned_time))
    return rows


def render(report: dict) -> str:
    return render_table(summary_rows(report), columns(report))


def _data_note(report: dict) -> str:
    """What the figures were measured on: held-out tokens for an LLM run, held-out images for a CLIP run."""
    images = report.get("eval_data")
    if images is not None:
        masked = report.get("masked", {})
        return (
            f"Accuracy of CLIP's zero-shot head (prompts {images['templates']}) on {images['heldout_images']} "
            f"held-out images ({images['heldout']}), {images['classes']} classes; the dense row is the zero-shot "
            f"model, the other is tuned on {images['train_images']} images. Masked: "
            f"{masked.get('targeted', 0):.2%} of the targeted weights, {masked.get('all', 0):.2%} of all parameters."
        )
    return _text_note(report) + " FLOPs per forward of one window (pruned: what a sparse kernel would run)."


def _text_note(report: dict) -> str:
    """Which text each perplexity read: the test part of the source (and of each out-of-domain text); what chose
    the kept masks (the validation part); the interval's method."""
    data, perplexity = report.get("data", {}), report.get("perplexity", {})
    if "perplexity" not in report:
        return ""
    note = (f"Perplexity over the {perplexity['tokens']:,} predicted tokens of the test part of "
            f"{data.get('source', 'the text')} ({perplexity['windows']} windows of {perplexity['seq_len']})")
    for name, text in report.get("extra_texts", {}).items():
        note += f"; {name}: the test part of that text ({text['perplexity']['windows']} windows), out of domain"
    selection = data.get("used", {}).get("selection")
    if selection is not None:
        note += f". The kept masks were chosen on {selection['windows']} validation windows, never on test"
    note += ". [95% CI]: bootstrap over windows (2000 resamples, fixed seed)"
    return note + ("; ± stderr: lm-eval's standard error." if "accuracy" in report else ".")


def _kernel_note(report: dict) -> str:
    """PyTorch's 2:4 kernels: the measured speed-up, or why they could not run (never a made-up number)."""
    kernel = report.get("semi_structured_kernel")
    if kernel is None:
        return ""
    if not kernel["available"]:
        return f" 2:4 sparse kernel: unavailable ({kernel['reason']})."
    return (f" 2:4 sparse kernel ({kernel['layers']} linears, {kernel['dtype']}, batch {kernel['batch']} x "
            f"{kernel['seq_len']}): prefill {kernel['dense_ms']:.1f} ms dense vs {kernel['sparse_ms']:.1f} ms sparse, "
            f"{kernel['speedup']:.2f}x.")


def write_report(directory: Path, report: dict) -> None:
    """report.md first, report.json last: report.json present means the run finished."""
    markdown = [
        f"# {report['method']} {report['sparsity']['target']} on {report['model']}",
        "",
        render_markdown_table(summary_rows(report), columns(report)),
        "",
        _data_note(report) + _kernel_note(report) + " Timings (s): "
        + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in report["timings"].items()),
        "",
    ]
    write_text_atomic(directory / "report.md", "\n".join(markdown))
    write_json_atomic(directory / "report.json", report)
