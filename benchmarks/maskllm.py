"""MaskLLM quality on SmolLM2-135M: `recipes/smollm2-135m/2of4-maskllm.yaml`, learned 2:4 masks on frozen weights.

Runs the recipe (or resumes it, or reuses it when its run directory already holds a finished run of the same
recipe), then writes the `maskllm` section of benchmarks/RESULTS.md: the held-out perplexity of the hard masks
against training tokens (step 0 = the SparseGPT prior; benchmarks/maskllm-curve.png), the final figures of the
kept (best) masks on the whole held-out split next to the dense model, and the training time.

    python benchmarks/maskllm.py [--output runs/smollm2-135m-2of4-maskllm] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

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


def section(recipe, report: dict, directory: Path, command: str, note: str) -> str:
    train = recipe.train
    tokens_per_step = train.batch_size * train.grad_accum * recipe.data.seq_len
    curve = evaluations(directory)
    dense, seq_len = report["dense"], recipe.data.seq_len
    weights = ("SparseGPT's weight update baked into the frozen weights" if recipe.method.prior_update_weights
               else "mask only: the weights are never changed")
    lines = [
        "## MaskLLM: learned 2:4 masks on frozen SmolLM2-135M weights", "",
        f"Command: `{command}` ({recipe.train.steps} steps x {tokens_per_step} tokens = "
        f"{recipe.train.steps * tokens_per_step:,} training tokens from the train part of the embedded CPython docs; "
        f"lr {train.lr:g}, tau {recipe.method.tau_start:g} -> {recipe.method.tau_end:g}, kappa "
        f"{recipe.method.kappa_start:g} -> {recipe.method.kappa_end:g}, prior {recipe.method.prior} ({weights}), prior strength {recipe.method.prior_strength:g}, sparse-weight regularizer "
        f"{recipe.method.sparse_weight_reg:g}; 2-core CPU, float32). {note}", "",
        f"Training took {report['timings']['train'] / 60:.0f} min (median {throughput(directory):.0f} tokens/s); the "
        f"whole run {sum(report['timings'].values()) / 60:.0f} min.", "",
        f"| model | perplexity (all held-out, {seq_len}-token windows) | last-word acc | FLOPs per {seq_len} tokens "
        "(2:4 kernel) |",
        "|---|---:|---:|---:|",
        f"| dense | {dense['perplexity']['value']:.2f} | {dense['accuracy']['docs_lastword']:.3f} | "
        f"{dense['flops']['dense'] / 1e9:.1f} G |",
        f"| MaskLLM 2:4, best masks (step {report['train']['best_step']}) | {report['perplexity']['value']:.2f} | "
        f"{report['accuracy']['docs_lastword']:.3f} | {report['flops']['semi_structured'] / 1e9:.1f} G |",
        "", f"Perplexity tokens: {report['perplexity']['tokens']:,}. One-shot baselines on the same held-out "
        "text are in the `oneshot` section (SparseGPT 2:4 mask only = this run's prior; SparseGPT 2:4 with its "
        "weight update). 2:4 kernel: "
        + (f"{report['semi_structured_kernel']['speedup']:.2f}x prefill" if report['semi_structured_kernel']['available']
           else "unavailable here (" + report['semi_structured_kernel']['reason'].split(';')[0] + ")") + ".", "",
        f"Held-out perplexity of the hard masks during training (the first {train.eval_windows} held-out windows, "
        f"{seq_len} tokens each; step 0 is the prior):", "",
        "| step | training tokens | perplexity |", "|---:|---:|---:|",
    ]
    lines += [f"| {step} | {step * tokens_per_step:,} | {value:.2f} |" for step, value in curve]
    lines += ["", "![MaskLLM training curve](maskllm-curve.png)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "runs" / "smollm2-135m-2of4-maskllm"))
    parser.add_argument("--set", action="append", default=[], help="recipe override (a dry run: not published)")
    parser.add_argument("--note", default="", help="a sentence on the conditions of this run")
    args = parser.parse_args()
    from prune.runs.pipeline import run
    from prune.runs.recipe import load_recipe

    recipe = load_recipe(RECIPE, [*args.set, f"output={args.output}"])
    directory = Path(args.output)
    report = finished_report(recipe, directory)
    if report is None:
        report = run(recipe, resume=(directory / "train" / "checkpoints").is_dir())
    command = "python benchmarks/maskllm.py" + "".join(f" --set '{item}'" for item in args.set)
    body = section(recipe, report, directory, command, args.note)
    print(body)
    if args.set:
        return
    shutil.copyfile(directory / "train_curve.png", CURVE)
    sys.path.insert(0, str(Path(__file__).parent))
    from results import write_section

    print(f"written to {write_section('maskllm', body)}")


if __name__ == "__main__":
    main()
