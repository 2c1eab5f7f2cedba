"""`prune sweep` on SmolLM2-135M: magnitude, Wanda, SparseGPT at 30-70% and 2:4, MaskLLM at 2:4, what sharing saves.

Three parts, each in its own process (so each peak RSS is its own), one invocation, side by side:
  1. `wanda`:    a 5-level Wanda sweep (30-70%) into a fresh sweep directory;
  2. `separate`: the same 5 points as 5 separate `prune.runs.pipeline.run` calls (each loads the model, measures the
                 dense baseline, calibrates sequentially; as 5 `prune run` invocations would, minus Python start-up);
  3. `rest`:     the full grid in the same sweep directory: the 5 Wanda points resume, the other 13 are computed;
  4. `learned`:  the grid plus MaskLLM (`nm_gumbel`, SparseGPT prior, a short mask training): the 18 one-shot points
                 resume, the learned method runs at 2:4 and is skipped, with its reason, at the fractional levels.
Writes the `sweep` section of benchmarks/RESULTS.md and benchmarks/sweep-perplexity.png. Every point is measured on
the test part of the embedded docs and of each eval.extra_texts text (labelled seen / not seen per point), with
95% bootstrap intervals and paired verdicts against the best of its level; the MaskLLM point keeps the masks its
VALIDATION evaluations pick.

    python benchmarks/sweep.py [--calibration-samples 16] [--seq-len 256] [--heldout-fraction 0.015] [--limit 20] \
        [--learned-steps 50]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "sweeps" / "smollm2-135m.yaml"
BASE = ROOT / "recipes" / "smollm2-135m" / "wanda-50.yaml"
WANDA_LEVELS = ["0.3", "0.4", "0.5", "0.6", "0.7"]
LEVELS = WANDA_LEVELS + ["2:4"]
ONE_SHOT = ["magnitude", "wanda", "sparsegpt"]
LEARNED = "{name: nm_gumbel, label: maskllm, prior: sparsegpt, sparse_weight_reg: 0.0}"


def overrides(args) -> list[str]:
    return [
        f"data.seq_len={args.seq_len}",
        f"data.calibration_samples={args.calibration_samples}",
        f"data.heldout_fraction={args.heldout_fraction}",
        "eval.tasks=[docs_lastword]",
        f"eval.limit={args.limit}",
        "eval.latency=false",
        *args.set,
    ]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def learned_overrides(args) -> list[str]:
    """The learned point's training (one-shot points drop train.*): `--learned-steps` steps of 2 sequences at
    lr 1e-3 (in so few steps a much smaller rate moves no logit past the prior's lead of 0.03), the hard masks
    evaluated on 4 validation windows every 10 steps and from the start, the best kept."""
    return [
        f"train.steps={args.learned_steps}",
        "train.batch_size=1",
        "train.grad_accum=2",
        "train.lr=1.0e-3",
        f"train.log_every={max(1, args.learned_steps // 10)}",
        "train.eval_every=10",
        "train.eval_windows=4",
    ]


ROW_KEYS = (
    "method",
    "sparsity",
    "perplexity",
    "perplexity.ci95",
    "verdict",
    "status",
    "timings.prune",
    "timings.pruned_eval",
)


def kept(key: str) -> bool:
    """The row keys a part reports: the point, its figures on each text and its seen / not seen labels."""
    return (
        key in ROW_KEYS
        or (key.startswith("extra_texts.") and key.endswith(".perplexity.value"))
        or key.startswith("data.seen.")
    )


def part_sweep(args, methods: list[str], levels: list[str], extra: list[str] = ()) -> dict:
    from prune.sweep.recipe import load_sweep
    from prune.sweep.runner import run_sweep

    sweep, base = load_sweep(
        RECIPE,
        overrides(args)
        + [
            f"grid.methods=[{', '.join(methods)}]",
            f"grid.sparsities=[{', '.join(levels)}]",
            f"output={args.output}",
            *extra,
        ],
    )
    start = time.perf_counter()
    result = run_sweep(sweep, base, progress=False, write=lambda line: print(line, file=sys.stderr, flush=True))
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_mb(),
        "counts": result["counts"],
        "shared": result["timings"]["shared"],
        "calibration_passes": result["calibration_passes"],
        "rows": [{key: value for key, value in row.items() if kept(key)} for row in result["rows"]],
    }


def part_separate(args) -> dict:
    from prune.runs.pipeline import run
    from prune.runs.recipe import load_recipe

    runs, start = [], time.perf_counter()
    for level in WANDA_LEVELS:
        recipe = load_recipe(
            BASE,
            overrides(args)
            + [f"method.sparsity={level}", "export.save_model=false", f"output={args.output}/separate/wanda-{level}"],
        )
        began = time.perf_counter()
        report = run(recipe, overwrite=True)
        runs.append(
            {
                "sparsity": level,
                "seconds": time.perf_counter() - began,
                "timings": report["timings"],
                "perplexity": report["perplexity"]["value"],
            }
        )
        print(
            f"separate wanda {level}: {runs[-1]['seconds']:.0f} s, perplexity {runs[-1]['perplexity']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_mb(), "runs": runs}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.part == "wanda":
        result = part_sweep(args, ["wanda"], WANDA_LEVELS)
    elif args.part == "separate":
        result = part_separate(args)
    elif args.part == "rest":
        result = part_sweep(args, ONE_SHOT, LEVELS)
    else:
        result = part_sweep(args, ONE_SHOT + [LEARNED], LEVELS, learned_overrides(args))
    print(json.dumps(result))


def section(args, parts: dict, command: str) -> str:
    wanda, separate, rest, learned = parts["wanda"], parts["separate"], parts["rest"], parts["learned"]
    output = Path(args.output)
    table = (output / "sweep.md").read_text().split("\n\n")[1].strip()  # the table under the title
    stage_sum = {}
    for run in separate["runs"]:
        for stage, seconds in run["timings"].items():
            stage_sum[stage] = stage_sum.get(stage, 0.0) + seconds
    shared = next(iter(wanda["shared"].values()), {})
    point_prune = sum(row["timings.prune"] or 0 for row in wanda["rows"] if row["status"] == "done")
    point_eval = sum(row["timings.pruned_eval"] or 0 for row in wanda["rows"] if row["status"] == "done")
    sweep_ppl = {row["sparsity"]: row["perplexity"] for row in wanda["rows"] if row["status"] == "done"}
    speedup = separate["seconds"] / wanda["seconds"]
    lines = [
        "## Sparsity sweep of SmolLM2-135M (`prune sweep`)",
        "",
        f"Command: `{command}` — {args.calibration_samples} x {args.seq_len} calibration tokens from the train part; "
        f"perplexity on the test part (the last {args.heldout_fraction:g}) of the embedded CPython docs and of "
        f"each eval.extra_texts text in {args.seq_len}-token windows, with 95% bootstrap intervals, each cell "
        "labelled by that point's report: `(seen)` when its calibration read the text, `(not seen)` when no part "
        "of it; `docs_lastword` "
        f"on up to {args.limit} examples (as many as that test text yields), FLOPs per {args.seq_len}-token forward, "
        "latency off; shared 2-core CPU, float32, "
        f"{args.threads} intra-op thread(s) (the machine was loaded by other jobs: one thread was several times "
        "faster than two). Equivalent CLI: `prune sweep recipes/sweeps/smollm2-135m.yaml --set "
        f"'grid.sparsities=[{', '.join(LEVELS)}]' " + " ".join(f"--set '{o}'" for o in overrides(args)) + "`.",
        "",
        "### Shared work vs one run per point (5-level Wanda, 30-70%)",
        "",
        "| | wall time (s) | load | dense eval | calibration | pruning | pruned eval | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| `prune sweep` (one process) | {wanda['seconds']:.0f} | {shared.get('load', 0):.0f} | "
        f"{shared.get('dense_eval', 0):.0f} | {shared.get('calibration', 0):.0f} (1 pass) | {point_prune:.0f} | "
        f"{point_eval:.0f} | {wanda['peak_rss_mb']:.0f} |",
        f"| 5 x `prune.runs.pipeline.run` | {separate['seconds']:.0f} | {stage_sum.get('load', 0):.0f} | "
        f"{stage_sum.get('dense_eval', 0):.0f} | (in pruning: 5 sequential passes) | {stage_sum.get('prune', 0):.0f} | "
        f"{stage_sum.get('pruned_eval', 0):.0f} | {separate['peak_rss_mb']:.0f} |",
        "",
        f"**Speed-up: {speedup:.1f}x** (goal: at least 2x). The sweep loads the model and measures the dense model "
        "once, and gathers Wanda's statistics in one pass over the dense model; separate runs repeat all three per "
        "point, and their sequential calibration runs every block twice (statistics, then the pruned block's outputs).",
        "",
        "Perplexity of the same Wanda points, shared dense statistics (sweep) vs sequential calibration (`prune run`):",
        "",
        "| sparsity | sweep | prune run |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {run['sparsity']} | {sweep_ppl.get(run['sparsity'], float('nan')):.3f} | {run['perplexity']:.3f} |"
        for run in separate["runs"]
    ]
    rest_shared = next(iter(rest["shared"].values()), {})
    lines += [
        "",
        "### The grid: magnitude, Wanda, SparseGPT at 30-70% and 2:4",
        "",
        f"The 18-point sweep ran in {wanda['seconds'] + rest['seconds']:.0f} s over two invocations of the same sweep "
        f"directory: the first computed the 5 Wanda points ({wanda['seconds']:.0f} s); the second resumed them and "
        f"computed the other 13 ({rest['seconds']:.0f} s, counts {rest['counts']}), gathering statistics again because "
        "SparseGPT needs Hessians that the Wanda-only pass had not stored (calibration "
        f"{rest_shared.get('calibration', 0):.0f} s). "
        f"Peak RSS of that process: {rest['peak_rss_mb']:.0f} MB. The whole benchmark (four processes) took "
        f"{parts.get('total', 0):.0f} s.",
        "",
        f"A fourth invocation added the learned method, MaskLLM (`nm_gumbel`, label `maskllm`: SparseGPT mask as the "
        f"prior, weights frozen, no sparse-weight regularizer, {args.learned_steps} training steps of 2 x "
        f"{args.seq_len} "
        f"tokens, lr 1e-3, best of the "
        f"evaluations every 10 steps on 4 validation windows (the prior included; never the test part); "
        f"{learned['seconds']:.0f} s, counts {learned['counts']}): it runs at 2:4 only and is skipped at the "
        "fractional "
        "levels with the reason in the table. This short training is a sweep-sized taste; the full MaskLLM result "
        "is in the `maskllm` section.",
        "",
        table,
        "",
        "Bold: the lowest perplexity of its level. `vs best`: a paired bootstrap over the same test windows against "
        "that point (`worse` when the whole 95% interval of ppl / ppl_best lies above 1, else `not distinguishable "
        "from best`), per text. `x dense`: perplexity over the dense model's. Time: pruning + evaluating the point "
        "(the shared load, dense eval and calibration are not in the rows).",
        "",
        "![perplexity vs sparsity](sweep-perplexity.png)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heldout-fraction", type=float, default=0.015)
    parser.add_argument("--limit", type=int, default=20, help="docs_lastword examples")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--output", default=str(ROOT / "runs" / "bench-sweep"))
    parser.add_argument(
        "--set", action="append", default=[], help="extra recipe override (e.g. a tiny model for a dry run)"
    )
    parser.add_argument("--learned-steps", type=int, default=50, help="mask-training steps of the MaskLLM point")
    parser.add_argument("--part", choices=["wanda", "separate", "rest", "learned"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        child(args)
        return
    shutil.rmtree(args.output, ignore_errors=True)
    flags = [
        "--calibration-samples",
        str(args.calibration_samples),
        "--seq-len",
        str(args.seq_len),
        "--heldout-fraction",
        str(args.heldout_fraction),
        "--limit",
        str(args.limit),
        "--threads",
        str(args.threads),
        "--learned-steps",
        str(args.learned_steps),
    ]
    flags += [item for override in args.set for item in ("--set", override)]
    parts, began_all = {}, time.perf_counter()
    for part in ("wanda", "separate", "rest", "learned"):
        began = time.perf_counter()
        output = subprocess.run(
            [sys.executable, __file__, "--part", part, "--output", args.output, *flags],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout
        parts[part] = json.loads(output.strip().splitlines()[-1])
        print(f"part {part}: {time.perf_counter() - began:.0f} s", flush=True)
    parts["total"] = time.perf_counter() - began_all
    if args.set:  # a dry run on other settings (e.g. a tiny model): print, do not publish
        print(section(args, parts, "dry run"))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from results import write_section

    shutil.copyfile(Path(args.output) / "perplexity_vs_sparsity.png", Path(__file__).with_name("sweep-perplexity.png"))
    command = "python benchmarks/sweep.py " + " ".join(flags)
    body = section(args, parts, command)
    print(body)
    print(f"written to {write_section('sweep', body)}")


if __name__ == "__main__":
    main()
