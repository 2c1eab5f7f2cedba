"""One-shot baselines on SmolLM2-135M: dense, magnitude, Wanda, SparseGPT at 50% and 2:4.

For each point: perplexity (512-token windows) on the test part of the embedded CPython docs and of the other
texts every run measures (eval.extra_texts' default: moby-dick and the never-seen sotu), each with its 95%
bootstrap interval over windows and labelled seen / not seen by that point's calibration (prune.data.seen: the
docs, for the methods that calibrate); last-word accuracy with
lm-eval's standard error; FLOPs; and the wall time and peak memory of the pruning step alone. Calibration reads
the train part only. Each point runs in its own process so peak memory is its own; all points run in
one invocation, side by side (finished points are kept under --cache, so an interrupted run resumes). Writes the
`oneshot` section of benchmarks/RESULTS.md.

    python benchmarks/oneshot.py [--calibration-samples 128] [--limit 200]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from results import interval, seen_label, write_section  # noqa: E402

# (label, method, sparsity, extra method config)
POINTS = [
    ("dense", "dense", None, {}),
    ("magnitude", "magnitude", "0.5", {}),
    ("magnitude", "magnitude", "2:4", {}),
    ("wanda", "wanda", "0.5", {}),
    ("wanda", "wanda", "2:4", {}),
    ("sparsegpt", "sparsegpt", "0.5", {}),
    ("sparsegpt", "sparsegpt", "2:4", {}),
    ("sparsegpt (mask only)", "sparsegpt", "2:4", {"update_weights": False}),
]


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def measure_point(
    label: str, method: str, sparsity: str | None, extra: dict, calibration_samples: int, limit: int, threads: int
) -> dict:
    """Load, prune (timed, peak memory), merge, evaluate: one point, in this process."""
    import torch

    torch.set_num_threads(threads)
    from eval.accuracy import accuracy_scores
    from eval.bootstrap import perplexity_ci
    from eval.flops import count_flops, count_params
    from eval.lastword import build_examples
    from eval.perplexity import perplexity
    from prune.data.config import EXTRA_TEXTS
    from prune.data.seen import seen_texts
    from prune.data.text import prepare, prepare_extra
    from prune.masks.base import merge
    from prune.methods.registry import get_method
    from prune.runs.loading import load_model
    from prune.runs.recipe import parse_recipe

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    splits = prepare(tokenizer, "embedded-docs")
    extra_texts = prepare_extra(tokenizer, list(EXTRA_TEXTS), 512)
    result = {"method": label, "sparsity": sparsity or "-", "extra_texts": {}}
    calibrates = method != "dense" and get_method(method).needs_calibration
    result["seen"] = seen_texts("embedded-docs", [], ["embedded-docs", *EXTRA_TEXTS], reads=calibrates)
    if method != "dense":
        recipe = parse_recipe({"method": {"name": method, "sparsity": sparsity, **extra}})
        spec = get_method(method)
        calibration = splits.calibration_blocks(calibration_samples, 512, 0) if spec.needs_calibration else None
        before = rss_mb()
        start = time.perf_counter()
        spec.attach(model, recipe.method, calibration)
        result["prune_seconds"] = time.perf_counter() - start
        result["prune_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["prune_added_rss_mb"] = result["prune_peak_rss_mb"] - before
        merge(model)
    for name, text in (("embedded-docs", splits), *extra_texts.items()):
        measured = perplexity(model, text.test_blocks(512))
        figures = {
            "value": measured.value,
            "ci95": perplexity_ci(measured.window_nll, measured.window_tokens),
            "windows": measured.windows,
        }
        if name == "embedded-docs":
            result["perplexity"], result["perplexity_ci95"] = figures["value"], figures["ci95"]
            result["perplexity_windows"] = figures["windows"]
        else:
            result["extra_texts"][name] = figures
    test_text = splits.test_text(tokenizer)
    lastword = accuracy_scores(model, tokenizer, ["docs_lastword"], heldout_text=test_text, limit=limit)[
        "docs_lastword"
    ]
    result["lastword"], result["lastword_stderr"] = lastword.value, lastword.stderr
    result["lastword_examples"] = min(limit, len(build_examples(test_text)))
    flops = count_flops(model, 512)
    result.update(flops_dense=flops.dense, flops_pruned=flops.sparse, params_nonzero=count_params(model).nonzero)
    return result


def with_ci(row: dict, name: str) -> str:
    """A text's perplexity, interval and label for that point (none for dense, which read nothing)."""
    figures = (
        {"value": row["perplexity"], "ci95": row["perplexity_ci95"]}
        if name == "embedded-docs"
        else row["extra_texts"][name]
    )
    seen = None if row["method"] == "dense" else row["seen"][name]
    return interval(figures["value"], figures["ci95"]) + seen_label(seen)


def table(rows: list[dict]) -> str:
    texts = list(rows[0]["extra_texts"])
    lines = [
        "| method | sparsity | test perplexity [95% CI] | "
        + "".join(f"{name} [95% CI] | " for name in texts)
        + "last-word acc ± stderr | FLOPs (pruned / dense) | nonzero params | prune time (s) | "
        "peak RSS while pruning (MB) |",
        "|---|---|---|" + "---|" * len(texts) + "---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['sparsity']} | {with_ci(row, 'embedded-docs')} | "
            + "".join(f"{with_ci(row, name)} | " for name in texts)
            + f"{row['lastword']:.3f} ± {row['lastword_stderr']:.3f} | "
            f"{row['flops_pruned'] / 1e9:.1f} G / {row['flops_dense'] / 1e9:.1f} G | "
            f"{row['params_nonzero'] / 1e6:.1f} M | "
            + (
                f"{row['prune_seconds']:.0f} | {row['prune_peak_rss_mb']:.0f} |"
                if "prune_seconds" in row
                else "- | - |"
            )
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--limit", type=int, default=200, help="last-word examples")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--cache",
        default=str(Path(__file__).resolve().parent.parent / "runs" / "bench-oneshot"),
        help="where finished points are kept (delete it to measure everything again)",
    )
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a paragraph added under the table (the conditions of this run, what moved since the last one)",
    )
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point is not None:
        print(json.dumps(measure_point(*POINTS[args.point], args.calibration_samples, args.limit, args.threads)))
        return
    # finished points are kept per setting, so an interrupted benchmark resumes where it stopped
    # (v3: every default extra text, labelled seen / not seen; v2 points measured moby-dick alone)
    done = Path(args.cache) / f"v3-calib{args.calibration_samples}-limit{args.limit}-threads{args.threads}"
    done.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (label, _, sparsity, _) in enumerate(POINTS):
        saved = done / f"point-{index}.json"
        if not saved.is_file():
            command = [
                sys.executable,
                __file__,
                "--point",
                str(index),
                "--threads",
                str(args.threads),
                "--calibration-samples",
                str(args.calibration_samples),
                "--limit",
                str(args.limit),
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            saved.write_text(output.strip().splitlines()[-1])
        rows.append(json.loads(saved.read_text()))
        print(f"{label} {sparsity or ''}: perplexity {rows[-1]['perplexity']:.2f}", flush=True)
    from prune.sweep.compare import LEGEND

    command = (
        f"python benchmarks/oneshot.py --calibration-samples {args.calibration_samples} --limit {args.limit} "
        f"--threads {args.threads}"
    )
    body = (
        f"## One-shot pruning of SmolLM2-135M\n\nCommand: `{command}` "
        f"({args.calibration_samples} x 512 calibration tokens, 2-core CPU, {args.threads} torch thread(s), "
        f"float32). Perplexity over the test part (the last 10%) of the embedded CPython documentation "
        f"({rows[0]['perplexity_windows']} windows of 512 tokens) and of "
        + ", ".join(f"{name} ({figures['windows']} windows)" for name, figures in rows[0]["extra_texts"].items())
        + f", [95% CI] from a bootstrap over windows; {LEGEND} Calibration "
        "draws from the docs' train part only; last-word accuracy ± lm-eval's standard error on the "
        f"{rows[0]['lastword_examples']} `docs_lastword` examples the test text yields (limit {args.limit}); "
        "FLOPs per 512-token forward (pruned: what a sparse kernel would run); "
        "prune time and peak RSS are the pruning step alone (the process had loaded the model and data before).\n\n"
        + table(rows)
        + "".join(f"\n\n{note}" for note in args.note)
    )
    print(table(rows))
    print(f"written to {write_section('oneshot', body)}")


if __name__ == "__main__":
    main()
