"""MaskLLM quality on SmolLM2-135M: `recipes/smollm2-135m/2of4-maskllm.yaml`, learned 2:4 masks on frozen weights.

Runs the recipe (or resumes it, or reuses it when its run directory already holds a finished run of the same
recipe) and, on the same data and evaluation settings, SparseGPT 2:4 with and without its weight update; then
writes the `maskllm` section of benchmarks/RESULTS.md. The protocol: the kept masks are the best of the periodic
evaluations on the VALIDATION part (step 0 = the SparseGPT prior; benchmarks/maskllm-curve.png); every model is
then measured on the TEST part of the embedded CPython docs and of each eval.extra_texts text (moby-dick and the
never-seen sotu by default; each cell labelled seen / not seen by that run, from its report.json), each
perplexity with its 95% bootstrap interval over windows, and each run is paired window by window with the best
of the runs (`prune compare`'s verdicts: best / not distinguishable from best / worse); `--variant` adds finished
runs of the recipe with other training settings to the same table.

    python benchmarks/maskllm.py [--output runs/smollm2-135m-2of4-maskllm] [--set KEY=VALUE ...]
    python benchmarks/maskllm.py --set train.distill=1.0 --output runs/smollm2-135m-2of4-maskllm-distill
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results import labelled, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "smollm2-135m" / "2of4-maskllm.yaml"
CURVE = Path(__file__).with_name("maskllm-curve.png")


def finished_report(recipe, directory: Path) -> dict | None:
    """report.json of a finished run of exactly this recipe in `directory`, else None."""
    report = directory / "report.json"
    if not report.is_file():
        return None
    content = json.loads(report.read_text())
    return content if content.get("recipe_fingerprint") == recipe.fingerprint() else None


def evaluations(directory: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (directory / "train" / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_perplexity"]) for r in records if "eval_perplexity" in r]


def throughput(directory: Path) -> float:
    """Median tokens/s over the training log lines."""
    records = [json.loads(line) for line in (directory / "train" / "train_log.jsonl").read_text().splitlines()]
    rates = sorted(record["tokens_per_s"] for record in records if "tokens_per_s" in record)
    return rates[len(rates) // 2]


BASELINES = [
    ("SparseGPT 2:4, weights updated", "sparsegpt-2of4", "true"),
    ("SparseGPT 2:4, mask only (this run's prior)", "sparsegpt-2of4-mask-only", "false"),
]


def ran(recipe) -> dict:
    """The finished report of `recipe` in its output directory, running (or resuming) it when there is none."""
    from prune.runs.pipeline import run

    directory = Path(recipe.output)
    report = finished_report(recipe, directory)
    return report if report is not None else run(recipe, resume=(directory / "train" / "checkpoints").is_dir())


def baselines(overrides: list[str], prefix: str, which=BASELINES) -> list[tuple[str, Path]]:
    """SparseGPT 2:4 with and without its weight update (`which` of BASELINES), on the MaskLLM recipe's data and
    evaluation settings: the same test windows, so every run pairs with every other. They train nothing, so
    training settings (steps, distillation) are not theirs: a variant of the training reuses the same baseline
    runs. They skip the dense baseline, which the learned run measures on the same windows."""
    from prune.runs.recipe import load_recipe

    runs = []
    for label, name, update in which:
        method = f"method={{name: sparsegpt, sparsity: '2:4', update_weights: {update}}}"
        settings = ["train.steps=0", "train.distill=0", "eval.dense_baseline=false", f"output={prefix}-{name}"]
        recipe = load_recipe(RECIPE, [*overrides, method, *settings])
        ran(recipe)
        runs.append((label, Path(recipe.output)))
    return runs


def comparison(runs: list[tuple[str, Path]], texts: list[str]) -> tuple[list[str], dict[str, dict]]:
    """The table of every run (paired verdicts from `prune compare`) and each run's row by label; each text's
    cell says whether that run read the text (its report's `data.seen`)."""
    from prune.sweep.compare import rows_from_runs, text_keys

    rows = rows_from_runs([directory for _, directory in runs])
    labels = {str(directory): label for label, directory in runs}
    by_label = {("dense" if row["status"] == "dense" else labels[row["dir"]]): row for row in rows}
    lines = [
        "| model | test perplexity [95% CI] | vs best | "
        + "".join(f"{name} perplexity [95% CI] | vs best | " for name in texts)
        + "last-word acc ± stderr | FLOPs (2:4 kernel) |",
        "|---|---:|---|" + "---:|---|" * len(texts) + "---:|---:|",
    ]
    for label, row in by_label.items():
        flops = row.get("flops.semi_structured") if row["status"] == "done" else row.get("flops.dense")
        lines.append(
            f"| {label} | {labelled(row, None)} | {row.get('verdict', '-')} | "
            + "".join(f"{labelled(row, name)} | {row.get(text_keys(name)['verdict'], '-')} | " for name in texts)
            + f"{row['accuracy.docs_lastword']:.3f} ± {row['accuracy_stderr.docs_lastword']:.3f} | "
            f"{flops / 1e9:.1f} G |"
        )
    return lines, by_label


def goal_lines(by_label: dict[str, dict], learned_labels: list[str], ood: str) -> list[str]:
    """The MaskLLM goal, for each learned run: on test, below SparseGPT-with-update with non-overlapping intervals;
    out of domain, below it."""
    from prune.sweep.compare import text_keys

    updated, keys, lines = by_label[BASELINES[0][0]], text_keys(ood), []
    for label in learned_labels:
        learned = by_label[label]
        apart = learned["perplexity.ci95"][1] < updated["perplexity.ci95"][0]
        below = learned[keys["value"]] < updated[keys["value"]]
        lines.append(
            f"Goal, {label} (test perplexity below SparseGPT 2:4 with its update, intervals apart: "
            f"{'met' if apart else 'not met'}; out of domain below it: {'met' if below else 'not met'}): "
            f"test {learned['perplexity']:.2f} vs {updated['perplexity']:.2f}, {ood} "
            f"{learned[keys['value']]:.2f} vs {updated[keys['value']]:.2f}."
        )
    return lines


def mixed_windows(recipe, data: dict) -> str:
    """How the train windows were shared between the docs and the data.mix texts, from report.json's counts."""
    counts = {
        name: data["mix"][name]["used"]["calibration, training"].get(  # reports from before source_share:
            "windows", data["mix"][name]["windows"]["train"]
        )
        for name in recipe.data.mix
    }  # every train window
    docs = data["used"]["training"]["windows"] - sum(counts.values())
    share = recipe.data.source_share
    how = f"data.source_share {share:g}" if share is not None else "every train window of each text"
    return (
        f"data.mix: calibration and training draw from {docs} train windows of the docs and "
        + ", ".join(f"{count} of {name}" for name, count in counts.items())
        + f", {how}; selection alternates between the texts' validation windows"
    )


def section(
    recipe, report: dict, directory: Path, runs: list[tuple[str, Path]], learned: list[str], command: str, note: str
) -> str:
    from prune.sweep.compare import LEGEND

    train = recipe.train
    tokens_per_step = train.batch_size * train.grad_accum * recipe.data.seq_len
    curve = evaluations(directory)
    seq_len, extra, data = recipe.data.seq_len, recipe.eval.extra_texts, report["data"]
    # the goal is judged on a text the MaskLLM run never read (prune.data.seen); the first extra text otherwise
    ood = next((name for name in extra if not data.get("seen", {}).get(name, True)), extra[0])
    weights = (
        "SparseGPT's weight update baked into the frozen weights"
        if recipe.method.prior_update_weights
        else "mask only: the weights are never changed"
    )
    table, by_label = comparison(runs, extra)
    mix = recipe.data.mix
    texts = (
        f"s of the embedded CPython docs and of {', '.join(mix)} ({mixed_windows(recipe, data)})"
        if mix
        else (" of the embedded CPython docs")
    )
    lines = [
        "## MaskLLM: learned 2:4 masks on frozen SmolLM2-135M weights",
        "",
        f"Command: `{command}` ({recipe.train.steps} steps x {tokens_per_step} tokens = "
        f"{recipe.train.steps * tokens_per_step:,} training tokens from the train part{texts}; "
        f"lr {train.lr:g}, tau {recipe.method.tau_start:g} -> {recipe.method.tau_end:g}, kappa "
        f"{recipe.method.kappa_start:g} -> {recipe.method.kappa_end:g}, prior {recipe.method.prior} ({weights}), "
        f"prior strength {recipe.method.prior_strength:g}, sparse-weight regularizer "
        f"{recipe.method.sparse_weight_reg:g}; 2-core CPU, float32). {note}",
        "",
        f"Training took {report['timings']['train'] / 60:.0f} min (median {throughput(directory):.0f} tokens/s); the "
        f"whole run {sum(report['timings'].values()) / 60:.0f} min.",
        "",
        f"Parts of the docs' token stream (train / validation / test): {data['splits']['train']} / "
        f"{data['splits']['validation']} / {data['splits']['test']}, {data['windows']['train']} / "
        f"{data['windows']['validation']} / {data['windows']['test']} windows of {seq_len} tokens. The kept masks "
        f"(step {report['train']['best_step']}) are the best of the evaluations on the first {train.eval_windows} "
        f"validation windows{' (the texts alternating)' if mix else ''}; every figure below reads only test parts "
        f"({data['windows']['test']} windows of the docs, "
        + ", ".join(f"{data['extra_texts'][name]['windows']['test']} of {name}" for name in extra)
        + "). [95% CI]: bootstrap over windows; `vs best`: paired bootstrap against the lowest of the runs on the "
        f"same windows. {LEGEND}",
        "",
        *table,
        "",
        *(line for goal in goal_lines(by_label, learned, ood) for line in (goal, "")),
        "2:4 kernel: "
        + (
            f"{report['semi_structured_kernel']['speedup']:.2f}x prefill"
            if report["semi_structured_kernel"]["available"]
            else "unavailable here (" + report["semi_structured_kernel"]["reason"].split(";")[0] + ")"
        )
        + ".",
        "",
        f"Validation perplexity of the hard masks during training (the first {train.eval_windows} validation windows, "
        f"{seq_len} tokens each; step 0 is the prior):",
        "",
        "| step | training tokens | perplexity |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {step} | {step * tokens_per_step:,} | {value:.2f} |" for step, value in curve]
    lines += ["", "![MaskLLM training curve](maskllm-curve.png)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "runs" / "smollm2-135m-2of4-maskllm"))
    parser.add_argument("--set", action="append", default=[], help="recipe override (a dry run: not published)")
    parser.add_argument("--note", default="", help="a sentence on the conditions of this run")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="a finished run of this recipe with other training settings (e.g. --set "
        "train.distill=1.0), compared in the same table",
    )
    parser.add_argument(
        "--baselines",
        default=str(ROOT / "runs" / "smollm2-135m-2of4-maskllm"),
        help="prefix of the baseline runs' directories (PREFIX-sparsegpt-2of4, ...)",
    )
    args = parser.parse_args()
    from prune.runs.recipe import load_recipe

    recipe = load_recipe(RECIPE, [*args.set, f"output={args.output}"])
    directory = Path(args.output)
    report = ran(recipe)
    variants = [(label, Path(path)) for label, _, path in (item.partition("=") for item in args.variant)]
    learned = [("MaskLLM 2:4, best masks", directory), *variants]
    runs = [*learned, *baselines(args.set, args.baselines)]
    command = (
        "python benchmarks/maskllm.py"
        + "".join(f" --set '{item}'" for item in args.set)
        + "".join(f" --variant '{item}'" for item in args.variant)
    )
    body = section(recipe, report, directory, runs, [label for label, _ in learned], command, args.note)
    print(body)
    if args.set:
        return
    shutil.copyfile(directory / "train_curve.png", CURVE)
    print(f"written to {write_section('maskllm', body)}")


if __name__ == "__main__":
    main()
