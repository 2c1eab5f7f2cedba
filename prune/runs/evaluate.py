"""`prune eval`: one model's figures outside any run (a run directory's model/, a model directory, an alias or a Hub
id), measured as a run measures them (prune.tasks.causal_lm.measure) and written as eval.json + eval.md.

Everything that can refuse does so before the model loads: the output (prune.runs.paths.check_eval_output, done by
the CLI before this module is imported), the accuracy task names, npm for a text it must fetch, the device and
dtype. The model loads in `--dtype` (auto: the checkpoint's, like a run's `runtime.dtype`) onto `--device`.
"""

from __future__ import annotations

from pathlib import Path

from eval.tables import render_markdown_table, render_table
from prune.core.atomic import write_json_atomic, write_text_atomic
from prune.data import prose
from prune.data.config import DataConfig
from prune.data.text import prepare, prepare_extra
from prune.models.loading import check_seq_len
from prune.models.runtime import resolve_runtime
from prune.models.runtime_config import RuntimeConfig
from prune.runs.loading import load_model
from prune.runs.paths import EVAL_JSON, EVAL_MD, EVAL_STAMP
from prune.runs.placed import local_model_dir
from prune.runs.report import columns, summary_row
from prune.tasks.causal_lm import CausalLM, check_eval_tasks, measure
from prune.tasks.eval_config import EvalConfig


def evaluate(model_name: str, data: DataConfig, config: EvalConfig, runtime: RuntimeConfig, output: Path) -> dict:
    """Measure `model_name` on `data` as `config` says, write `output`/eval.md and eval.json (last); returns
    eval.json's content. `output` was checked (prune.runs.paths.check_eval_output)."""
    measured = config.extra_texts if config.perplexity else []  # only perplexity reads them
    if config.tasks:
        check_eval_tasks(config, "--tasks")
    for name in dict.fromkeys((data.source, *measured)):
        if name in prose.TEXTS:
            prose.check_fetchable(name)
    model_dir = local_model_dir(model_name)  # a run's model/ where it has one: its dtype is the run's
    placed = resolve_runtime(runtime, model_dir / "config.json" if model_dir else None)

    model, tokenizer = load_model(model_name, placed.dtype)  # a run loads as prune.load_model(run_dir) rebuilds it
    model = model.to(placed.device)
    check_seq_len(model, data.seq_len, model_name, "--seq-len")
    splits = prepare(
        tokenizer, data.source, heldout_fraction=data.heldout_fraction, validation_fraction=data.validation_fraction
    )
    extra = prepare_extra(
        tokenizer,
        measured,
        data.seq_len,
        heldout_fraction=data.heldout_fraction,
        validation_fraction=data.validation_fraction,
    )
    figures = measure(model, tokenizer, splits, config, data.seq_len, model_name, placed.device, extra=extra)
    report = {
        "written_by": EVAL_STAMP,
        "model": model_name,
        "data": {"source": data.source, "seq_len": data.seq_len},
        "runtime": {"device": str(placed.device), "dtype": str(placed.dtype).removeprefix("torch.")},
        "eval": config.model_dump(mode="json"),
        **figures,
    }
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / EVAL_MD, markdown(report))
    write_json_atomic(output / EVAL_JSON, report)
    return report


def table(report: dict) -> str:
    """The terminal table: one row for the model."""
    return render_table([summary_row(report["model"], report)], columns(report))


def markdown(report: dict) -> str:
    """eval.md: the table, what each figure was measured on, where and in what precision."""
    runtime = report["runtime"]
    return "\n".join(
        [
            f"# prune eval: {report['model']}",
            "",
            render_markdown_table([summary_row(report["model"], report)], columns(report)),
            "",
            CausalLM.note(report) + f" Measured on {runtime['device']} in {runtime['dtype']}.",
            "",
        ]
    )
