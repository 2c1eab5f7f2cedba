"""Recovery training after pruning on SmolLM2-135M (issue 22's goals): SparseGPT 2:4 and VIB at 50% of the
parameters removed, each followed by recovery of the kept weights within a training-token budget (default 400k
tokens per recovery run); writes the `recover` section of benchmarks/RESULTS.md.

Protocol: each part runs its shipped recipe (recipes/smollm2-135m/sparsegpt-2of4.yaml, vib-50.yaml) through
`prune run` with a `recover` section, once per variant (masked LoRA; masked full fine-tune at two learning
rates; all distilled from the dense model by default). Every choice reads the VALIDATION part: the recovery's
best step (recover.eval_every; the pruned model itself competes at step 0) and the variant kept (the lowest
validation perplexity). The reported figures are the TEST parts of the docs and of every eval.extra_texts text,
each with its 95% bootstrap interval and paired window by window with the same model before recovery (ppl after
/ before: better, worse or not distinguishable); benchmarks/recover-curves.png draws each variant's validation
scores against the tokens read. A text is "seen" when the run's data section reads it (data.source, data.mix),
else "not seen"; the out-of-domain goals are judged on not-seen texts only.

VIB trains its masks once: every later variant starts from a copy of the first variant's finished mask training
(train/ holds its checkpoint at the last step; the run resumes there), so all variants recover the same masks.

    python benchmarks/recover.py --threads 1          # the real budget: 400k tokens per recovery run
    python benchmarks/recover.py --tokens 2048 --mask-steps 2 --eval-every 1 --eval-windows 2 --dry-run \\
        --set 'eval.tasks=[]' --set eval.latency=false --set data.calibration_samples=4   # a quick end-to-end check
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from peer_llmcompressor import nm_violations  # noqa: E402
from results import interval, seen_in_report, write_section  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CURVES = ROOT / "benchmarks" / "recover-curves.png"
RECIPES = ROOT / "recipes" / "smollm2-135m"
PARTS = {  # part -> (recipe, label of the pruned model, goals: max x dense on the docs, on a not-seen text)
    "sparsegpt": (RECIPES / "sparsegpt-2of4.yaml", "SparseGPT 2:4", 1.5, 2.5),
    "vib": (RECIPES / "vib-50.yaml", "VIB 50% removed", 2.0, 3.0),
}
PATTERNS = {"sparsegpt": (2, 4)}  # the N:M pattern a part's saved model must still hold after recovery
VARIANTS = {  # the recovery settings compared on validation
    "lora": ["recover.mode=lora", "recover.rank=16", "recover.alpha=32", "recover.lr=2e-4"],
    "full": ["recover.mode=full", "recover.lr=5e-5"],
    "full-lr2e-4": ["recover.mode=full", "recover.lr=2e-4"],
}


def finished_report(recipe) -> dict | None:
    """report.json of a finished run of exactly this recipe in its output directory, else None."""
    report = Path(recipe.output) / "report.json"
    if not report.is_file():
        return None
    content = json.loads(report.read_text())
    return content if content.get("recipe_fingerprint") == recipe.fingerprint() else None


def start_from_masks_of(source: Path, recipe) -> None:
    """Give a new run directory the finished mask training of `source` (same model, data, method and train
    section), so that resuming it trains no masks and recovers the very same ones."""
    from prune.runs import run_dir

    target = Path(recipe.output)
    if target.exists() or not (source / run_dir.CHECKPOINTS).is_dir():
        return
    target.mkdir(parents=True)
    for name in (run_dir.MARKER_FILE, run_dir.DENSE_FILE, run_dir.TRAIN_DIR):
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name)
        elif (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    (target / run_dir.RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def ran(recipe) -> dict:
    """The finished report of `recipe`, running (or resuming) it when there is none."""
    from prune.runs.pipeline import run
    from prune.runs.run_dir import last_checkpoint

    report = finished_report(recipe)
    return report if report is not None else run(recipe, resume=last_checkpoint(recipe.output) is not None)


def seen_labels(report: dict, texts: list[str]) -> dict[str, str]:
    """Each measured text's label, "seen" or "not seen", from the run's report.json (`data.seen`, derived by
    prune.data.seen from the recipe's data section: data.source and every data.mix text are seen)."""
    return {text: "seen" if seen else "not seen" for text, seen in seen_in_report(report, texts, "docs").items()}


def recovery_log(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "recover" / "train_log.jsonl").read_text().splitlines()]


def tokens_per_second(directory: Path) -> float:
    """The median training throughput of the recovery log (tokens/s over all processes)."""
    return statistics.median(record["tokens_per_s"] for record in recovery_log(directory) if "tokens_per_s" in record)


def validation_curve(directory: Path) -> list[tuple[int, float]]:
    """(step, validation perplexity) of each evaluation of a recovery run; step 0 is the pruned model itself."""
    return [
        (record["step"], record["eval_perplexity"]) for record in recovery_log(directory) if "eval_perplexity" in record
    ]


def validation_line(name: str, directory: Path) -> str:
    """A variant's validation perplexity at each evaluation: whether it was still falling when the budget ended."""
    scores = validation_curve(directory)
    return (
        f"Validation perplexity of `{name}` at steps {', '.join(str(step) for step, _ in scores)}: "
        + ", ".join(f"{value:.2f}" for _, value in scores)
        + "."
    )


def cell(figures: dict, dense: dict) -> str:
    return f"{interval(figures['value'], figures['ci95'])} | {figures['value'] / dense['value']:.2f}"


def text_figures(report: dict, text: str) -> dict:
    return report["perplexity"] if text == "docs" else report["extra_texts"][text]["perplexity"]


def chosen_variant(runs: dict[str, tuple[object, dict]]) -> str:
    """The variant kept: the lowest validation perplexity at its best step (never a test figure)."""
    return min(runs, key=lambda name: runs[name][1]["recover"]["best_eval_perplexity"])


def part_section(part: str, runs: dict[str, tuple[object, dict]]) -> list[str]:
    """One part's table (dense, the pruned model before recovery, each variant after it) and goal lines."""
    _, label, docs_goal, unseen_goal = PARTS[part]
    chosen = chosen_variant(runs)
    report = runs[chosen][1]
    dense, before = report["dense"], report["recover"]["before"]
    texts = ["docs", *report.get("extra_texts", {})]
    labels = seen_labels(report, texts)
    header = " | ".join(f"{text} ({labels[text]}) [95% CI] | x dense" for text in texts)
    lines = [
        f"**{label} + recovery** (chosen on validation: `{chosen}`)",
        "",
        f"| run | validation ppl (best step) | {header} | after / before (paired) | recovery s | tokens/s |",
        "|---|---:|" + "---:|---:|" * len(texts) + "---|---:|---:|",
        "| dense | - | "
        + " | ".join(cell(text_figures(dense, text), text_figures(dense, text)) for text in texts)
        + " | - | - | - |",
        f"| {label} | - | "
        + " | ".join(cell(text_figures(before, text), text_figures(dense, text)) for text in texts)
        + " | - | - | - |",
    ]
    for name, (variant_recipe, variant) in runs.items():
        section = variant["recover"]
        paired = "; ".join(
            f"{'docs' if key == 'perplexity' else key} {entry['ratio']:.3f} [{entry['ci95'][0]:.3f}, "
            f"{entry['ci95'][1]:.3f}] {entry['verdict']}"
            for key, entry in section.get("paired", {}).items()
        )
        lines.append(
            f"| {label} + recovery `{name}`{' (chosen)' if name == chosen else ''} | "
            f"{section['best_eval_perplexity']:.2f} ({section['best_step']}) | "
            + " | ".join(cell(text_figures(variant, text), text_figures(dense, text)) for text in texts)
            + f" | {paired} | {section['seconds']:.0f} | {tokens_per_second(Path(variant_recipe.output)):.0f} |"
        )
    validation = [validation_line(name, Path(variant_recipe.output)) for name, (variant_recipe, _) in runs.items()]
    return [
        *lines,
        "",
        *validation,
        "",
        *pattern_lines(part, runs),
        *goal_lines(report, texts, labels, label, docs_goal, unseen_goal),
    ]


def plot_curves(parts: dict[str, dict[str, tuple[object, dict]]], path: Path) -> None:
    """One panel per part: each variant's validation perplexity against the recovery tokens read, the variant kept
    drawn thick. Where a curve still falls at the end, the budget, not the method, stopped it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for axis, (part, runs) in zip(axes[0], parts.items()):
        chosen = chosen_variant(runs)
        for name, (recipe, report) in runs.items():
            tokens_per_step = report["recover"]["tokens_seen"] / report["recover"]["steps"]  # as the run counted
            steps, values = zip(*validation_curve(Path(recipe.output)))
            axis.plot(
                [step * tokens_per_step for step in steps],
                values,
                marker="o",
                linewidth=2.5 if name == chosen else 1.2,
                label=f"{name}{' (kept)' if name == chosen else ''}",
            )
        axis.set_title(f"{PARTS[part][1]} + recovery")
        axis.set_xlabel("recovery training tokens")
        axis.set_ylabel("validation perplexity (the mix it trains on)")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pattern_lines(part: str, runs: dict[str, tuple[object, dict]]) -> list[str]:
    """For an N:M part: whether each variant's saved model/ (merged, after recovery) still holds the pattern."""
    if part not in PATTERNS:
        return []
    n, m = PATTERNS[part]
    lines = []
    for name, (variant_recipe, _) in runs.items():
        model = AutoModelForCausalLM.from_pretrained(Path(variant_recipe.output) / "model")
        linears = [key for key, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
        decoder = sum(".layers." in key for key in linears)
        bad = nm_violations(model, n, m)
        lines.append(
            f"model/ of `{name}` is still exactly {n}:{m}: no group of {m} inputs of any of its {decoder} decoder "
            f"linears holds more than {n} nonzeros."
            if bad == 0
            else f"model/ of `{name}` is NOT {n}:{m} any more: {bad} groups of {m} inputs hold more than {n} nonzeros."
        )
    return [*lines, ""]


def goal_lines(report: dict, texts: list[str], labels: dict, label: str, docs_goal: float, unseen_goal: float):
    dense, paired = report["dense"], report["recover"].get("paired", {})
    docs = text_figures(report, "docs")["value"] / text_figures(dense, "docs")["value"]
    lines = [
        f"Goal, {label} + recovery on the docs' test part <= {docs_goal}x dense: "
        f"{'met' if docs <= docs_goal else 'not met'} ({docs:.2f}x)."
    ]
    unseen = [text for text in texts if labels[text] == "not seen"]
    for text in unseen:
        ratio = text_figures(report, text)["value"] / text_figures(dense, text)["value"]
        better = paired.get(text, {}).get("verdict") == "better"
        lines.append(
            f"Goal, {label} + recovery on {text} (not seen) <= {unseen_goal}x dense: "
            f"{'met' if ratio <= unseen_goal else 'not met'} ({ratio:.2f}x); better than without recovery by the "
            f"paired bootstrap: {'met' if better else 'not met'}."
        )
    if not unseen:
        lines.append(
            f"No measured text is unseen by this run ({', '.join(texts)}): the out-of-domain goal is not judged."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tokens", type=int, default=400_000, help="training tokens of each recovery run")
    parser.add_argument("--batch-size", type=int, default=4, help="recover.batch_size")
    parser.add_argument("--distill", type=float, default=1.0, help="recover.distill")
    parser.add_argument("--eval-every", type=int, default=25, help="recover.eval_every (validation)")
    parser.add_argument("--eval-windows", type=int, default=8, help="recover.eval_windows (validation)")
    parser.add_argument("--mask-steps", type=int, default=None, help="vib: train.steps (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=None, help="runtime.threads")
    parser.add_argument("--output-root", default=str(ROOT / "runs" / "recover"))
    parser.add_argument("--set", action="append", default=[], help="a recipe override for every run")
    parser.add_argument("--dry-run", action="store_true", help="print the section, do not write RESULTS.md")
    parser.add_argument("--note", default="", help="a sentence on the conditions of this run")
    args = parser.parse_args()
    from prune.runs.recipe import load_recipe

    common = [*args.set, *([f"runtime.threads={args.threads}"] if args.threads else [])]
    body = ["## Recovery training after pruning (SmolLM2-135M)", "", f"Command: `python {shlex.join(sys.argv)}`", ""]
    body += [args.note, ""] if args.note else []
    every_part = {}
    for part in args.parts:
        recipe_path = PARTS[part][0]
        seq_len = load_recipe(recipe_path, common).data.seq_len
        steps = args.tokens // (args.batch_size * seq_len)
        if steps < 1:
            raise SystemExit(f"--tokens {args.tokens} is less than one batch of {args.batch_size} x {seq_len} tokens")
        budget = [
            f"recover.steps={steps}",
            f"recover.batch_size={args.batch_size}",
            f"recover.distill={args.distill}",
            f"recover.eval_every={args.eval_every}",
            f"recover.eval_windows={args.eval_windows}",
            *([f"train.steps={args.mask_steps}"] if args.mask_steps and part == "vib" else []),
        ]
        runs, first = {}, None
        for name in args.variants:
            output = Path(args.output_root) / f"{part}-{name}"
            recipe = load_recipe(recipe_path, [*common, *budget, *VARIANTS[name], f"output={output}"])
            if first is not None and recipe.train.steps:
                start_from_masks_of(first, recipe)
            runs[name] = (recipe, ran(recipe))
            first = first or output
        every_part[part] = runs
        body += [
            *part_section(part, runs),
            f"Recovery read {steps} steps x {args.batch_size} x {seq_len} = "
            f"{steps * args.batch_size * seq_len:,} training tokens per variant.",
            "",
        ]
    body += [f"![Validation perplexity during recovery, every variant]({CURVES.name})"]
    text = "\n".join(body)
    print(text)
    if not args.dry_run:
        plot_curves(every_part, CURVES)
        print(f"written to {write_section('recover', text)}")


if __name__ == "__main__":
    main()
