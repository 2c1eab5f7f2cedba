"""How the shipped MaskLLM recipe's learned 2:4 masks do on a text they never read as the training budget grows.

Each budget is its own run of `recipes/smollm2-135m/2of4-maskllm.yaml` with train.steps = tokens / (batch_size x
grad_accum x seq_len), so each has the full tau/kappa schedule over its own steps (the masks halfway through a
longer run are not a shorter run's masks); the budget equal to the recipe's own steps is the shipped recipe's run
(benchmarks/maskllm.py's, reused). Each run keeps the masks its VALIDATION evaluations pick (the mix's validation
windows: docs, moby-dick, brown; never sotu) and is measured on the TEST parts of the docs, moby-dick and the
never-seen sotu, each with its 95% bootstrap interval. Against: SparseGPT 2:4 with its weight update, calibrated on
the same mix (benchmarks/maskllm.py's baseline run, reused), and dense. Runs finished with the same recipe are
reused, an interrupted one resumes. Writes the `maskllm-budget` section of benchmarks/RESULTS.md and
benchmarks/maskllm-budget.png.

    python benchmarks/maskllm_budget.py --threads 1 --tokens 204800 51200 102400
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from maskllm import BASELINES, RECIPE, baselines, ran  # noqa: E402
from results import interval, labelled, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLOT = Path(__file__).with_name("maskllm-budget.png")
SHIPPED_RUN = ROOT / "runs" / "smollm2-135m-2of4-maskllm"  # benchmarks/maskllm.py's run of the recipe
NOT_SEEN_TEXT = "sotu"
TEXTS = [None, "moby-dick", NOT_SEEN_TEXT]  # None: the docs' test part
SPARSEGPT = BASELINES[0][0]  # SparseGPT 2:4 with its weight update


def steps_for(tokens: int, tokens_per_step: int) -> int:
    """The optimizer steps of a budget of `tokens` training tokens; a budget must be a whole number of steps."""
    steps, rest = divmod(tokens, tokens_per_step)
    if rest or steps < 1:
        raise SystemExit(
            f"--tokens {tokens} is not a whole number of steps of {tokens_per_step} tokens (batch_size x grad_accum x "
            f"seq_len); use a multiple, e.g. {max(steps, 1) * tokens_per_step}."
        )
    return steps


def shipped_recipe():
    from prune.runs.recipe import load_recipe

    return load_recipe(RECIPE, [f"output={SHIPPED_RUN}"])


def budget_recipe(tokens: int, prefix: str):
    """The recipe at a budget: its own steps; the recipe's own budget is the shipped run (its directory).
    Only that run measures the dense baseline (the others read the same test windows)."""
    from prune.runs.recipe import load_recipe

    shipped = shipped_recipe()
    train, seq_len = shipped.train, shipped.data.seq_len
    steps = steps_for(tokens, train.batch_size * train.grad_accum * seq_len)
    if steps == train.steps:
        return shipped
    return load_recipe(RECIPE, [f"train.steps={steps}", "eval.dense_baseline=false", f"output={prefix}-{tokens}"])


def rows(budget_runs: list[tuple[int, Path]], baseline: Path) -> tuple[dict, dict, dict[int, dict]]:
    """(dense row, SparseGPT row, {tokens: row}) of `prune compare`'s table over all runs (the same windows)."""
    from prune.sweep.compare import rows_from_runs

    table = rows_from_runs([directory for _, directory in budget_runs] + [baseline])
    by_dir = {row.get("dir"): row for row in table}
    dense = next(row for row in table if row["status"] == "dense")
    return dense, by_dir[str(baseline)], {tokens: by_dir[str(directory)] for tokens, directory in budget_runs}


def value(row: dict, name: str | None) -> float:
    from prune.sweep.compare import text_keys

    return row[text_keys(name)["value"]]


def ci95(row: dict, name: str | None) -> tuple[float, float]:
    from prune.sweep.compare import text_keys

    return tuple(row[text_keys(name)["ci95"]])


def sotu(row: dict) -> str:
    return interval(value(row, NOT_SEEN_TEXT), ci95(row, NOT_SEEN_TEXT))


def goal(learned: dict, sparsegpt: dict, dense: dict) -> tuple[bool, bool]:
    """The goal on the not-seen text: (below SparseGPT with intervals apart, at most 2x dense)."""
    apart = ci95(learned, NOT_SEEN_TEXT)[1] < ci95(sparsegpt, NOT_SEEN_TEXT)[0]
    return apart, value(learned, NOT_SEEN_TEXT) <= 2 * value(dense, NOT_SEEN_TEXT)


def minutes(directory: Path) -> tuple[float, float]:
    """(training, whole run) minutes, from report.json's timings."""
    timings = json.loads((directory / "report.json").read_text())["timings"]
    return timings.get("train", 0.0) / 60, sum(timings.values()) / 60


def table(points: dict[int, dict], dirs: dict[int, Path], dense: dict, sparsegpt: dict) -> list[str]:
    from prune.sweep.compare import text_keys

    head = "| training tokens | steps | kept masks (step) | docs test [95% CI] | moby-dick [95% CI] | sotu [95% CI] |"
    lines = [
        head + " sotu vs the lowest (paired) | sotu / dense | training (whole run) |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        f"| dense | - | - | {labelled(dense, None)} | {labelled(dense, 'moby-dick')} | "
        f"{labelled(dense, NOT_SEEN_TEXT)} | - | 1.00 | - |",
    ]
    for tokens, row in sorted(points.items()):
        train, whole = minutes(dirs[tokens])
        lines.append(
            f"| {row['train.tokens_seen']:,} | {row['train.steps']} | {row['train.best_step']} | "
            f"{labelled(row, None)} | {labelled(row, 'moby-dick')} | {labelled(row, NOT_SEEN_TEXT)} | "
            f"{row.get(text_keys(NOT_SEEN_TEXT)['verdict'], '-')} | "
            f"{value(row, NOT_SEEN_TEXT) / value(dense, NOT_SEEN_TEXT):.2f} | {train:.0f} min ({whole:.0f} min) |"
        )
    lines.append(
        f"| {SPARSEGPT} | - | - | {labelled(sparsegpt, None)} | {labelled(sparsegpt, 'moby-dick')} | "
        f"{labelled(sparsegpt, NOT_SEEN_TEXT)} | {sparsegpt.get(text_keys(NOT_SEEN_TEXT)['verdict'], '-')} | "
        f"{value(sparsegpt, NOT_SEEN_TEXT) / value(dense, NOT_SEEN_TEXT):.2f} | - |"
    )
    return lines


def plot(points: dict[int, dict], dense: dict, sparsegpt: dict, path: Path) -> None:
    """One panel per text (sotu first): the learned masks' test perplexity with its interval against the budget;
    SparseGPT's interval as a band, dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(points)
    fig, axes = plt.subplots(1, len(TEXTS), figsize=(5 * len(TEXTS), 4))
    for axis, name in zip(axes, [NOT_SEEN_TEXT, None, "moby-dick"]):
        values = [value(points[tokens], name) for tokens in budgets]
        bounds = [ci95(points[tokens], name) for tokens in budgets]
        errors = [[v - low for v, (low, _) in zip(values, bounds)], [high - v for v, (_, high) in zip(values, bounds)]]
        axis.errorbar(budgets, values, yerr=errors, marker="o", capsize=3, label="MaskLLM 2:4 (learned masks)")
        low, high = ci95(sparsegpt, name)
        axis.axhspan(low, high, color="tab:orange", alpha=0.25)
        axis.axhline(value(sparsegpt, name), color="tab:orange", label="SparseGPT 2:4 + update, same mix")
        axis.axhline(value(dense, name), color="black", linestyle="--", label="dense")
        if name == NOT_SEEN_TEXT:
            axis.axhline(2 * value(dense, name), color="grey", linestyle=":", label="2x dense (goal)")
        seen = points[budgets[0]].get(f"data.seen.{name or points[budgets[0]]['data.source']}")
        axis.set_title(f"{name or 'CPython docs'} test part ({'seen' if seen else 'not seen'} in training)")
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [f"{tokens / 1000:.0f}k" for tokens in budgets])
        axis.set_xlabel("training tokens")
        axis.set_ylabel("perplexity [95% CI]")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(points, dirs, dense, sparsegpt, recipe, command: str, note: str) -> str:
    largest = max(points)
    reached = [tokens for tokens in sorted(points) if all(goal(points[tokens], sparsegpt, dense))]
    apart, within = goal(points[largest], sparsegpt, dense)
    shipped = recipe.train.steps * recipe.train.batch_size * recipe.train.grad_accum * recipe.data.seq_len
    verdict = (
        f"met at {', '.join(f'{tokens:,}' for tokens in reached)} training tokens"
        if reached
        else f"not met at any budget run here (largest, {largest:,} tokens: below SparseGPT with intervals apart: "
        f"{'yes' if apart else 'no'}; at most 2x dense: {'yes' if within else 'no'})"
    )
    shipped_line = ""
    if shipped in points:
        apart, within = goal(points[shipped], sparsegpt, dense)
        ratio = value(points[shipped], NOT_SEEN_TEXT) / value(dense, NOT_SEEN_TEXT)
        shipped_line = (
            f" The shipped recipe ({shipped:,} tokens): sotu {sotu(points[shipped])} against {sotu(sparsegpt)}: "
            f"intervals apart {'yes' if apart else 'no'}; {ratio:.2f}x dense ({'<=' if within else '>'} 2x)."
        )
    data = recipe.data
    return "\n".join(
        [
            "## MaskLLM: quality on the not-seen text against the training budget",
            "",
            f"Command: `{command}`. Each budget is its own run of the shipped recipe "
            f"(`recipes/smollm2-135m/2of4-maskllm.yaml`: data.mix {', '.join(data.mix)} beside the docs, "
            f"data.source_share {data.source_share:g}, distilled from the dense model, SparseGPT prior with its "
            f"update, lr {recipe.train.lr:g}) with train.steps set to the budget, so each has the whole tau/kappa "
            "schedule over its own steps. Each keeps the masks that its evaluations on the first "
            f"{recipe.train.eval_windows} validation windows of the mix (the texts alternating; never sotu) pick; "
            "every figure reads only test parts (docs, moby-dick, sotu). sotu is read by no run here. "
            f"SparseGPT 2:4 with its update is calibrated on the same mix ({data.calibration_samples} windows). "
            "[95% CI]: bootstrap over windows; `sotu vs the lowest`: `prune compare`'s paired verdict against the "
            "lowest sotu perplexity of these runs. Kept masks at step 0: no evaluation of that run beat its SparseGPT "
            "prior on validation, so its masks are the prior's (the SparseGPT 2:4 model itself). One torch thread, "
            "2-core CPU shared with other jobs (times are "
            f"contention, not cost). {note}",
            "",
            *table(points, {tokens: dirs[tokens] for tokens in points}, dense, sparsegpt),
            "",
            "Goal (the shipped MaskLLM recipe, learned 2:4 masks on frozen weights: on the not-seen text, below "
            "SparseGPT 2:4 with its update calibrated on the same data, intervals apart, and <= 2x dense there): "
            f"{verdict}.{shipped_line}",
            "",
            "![MaskLLM quality against the training budget](maskllm-budget.png)",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", required=True, help="training budgets, run in this order")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared CPU)")
    parser.add_argument("--prefix", default=str(ROOT / "runs" / "smollm2-135m-2of4-maskllm"), help="run directories")
    parser.add_argument("--note", default="", help="a sentence on the conditions of this run")
    args = parser.parse_args()
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    recipes = {tokens: budget_recipe(tokens, args.prefix) for tokens in args.tokens}  # bad budgets fail first
    [(_, baseline)] = baselines([], args.prefix, BASELINES[:1])
    dirs = {}
    for tokens, recipe in recipes.items():
        ran(recipe)
        dirs[tokens] = Path(recipe.output)
    dense, sparsegpt, points = rows(sorted(dirs.items()), baseline)
    command = "python benchmarks/maskllm_budget.py --threads 1 --tokens " + " ".join(map(str, args.tokens))
    body = section(points, dirs, dense, sparsegpt, shipped_recipe(), command, args.note)
    print(body)
    plot(points, dense, sparsegpt, PLOT)
    print(f"written to {write_section('maskllm-budget', body)} and {PLOT}")


if __name__ == "__main__":
    main()
