"""One-shot baselines on SmolLM2-135M: dense, magnitude, Wanda, SparseGPT at 50% and 2:4.

For each point: perplexity (512-token windows) on the test part of the embedded CPython docs and of an
out-of-domain text (moby-dick), each with its 95% bootstrap interval over windows; last-word accuracy with
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

from results import interval, write_section  # noqa: E402

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
    from prune.data.text import MOBY_DICK, prepare, prepare_extra
    from prune.masks.base import merge
    from prune.methods.registry import get_method
    from prune.runs.loading import load_model
    from prune.runs.recipe import parse_recipe

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    splits = prepare(tokenizer, "embedded-docs")
    ood = prepare_extra(tokenizer, [MOBY_DICK], 512)[MOBY_DICK]
    result = {"method": label, "sparsity": sparsity or "-"}
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
    for key, text in (("perplexity", splits), ("ood_perplexity", ood)):
        measured = perplexity(model, text.test_blocks(512))
        result[key], result[f"{key}_ci95"] = measured.value, perplexity_ci(measured.window_nll, measured.window_tokens)
        result[f"{key}_windows"] = measured.windows
    test_text = splits.test_text(tokenizer)
    lastword = accuracy_scores(model, tokenizer, ["docs_lastword"], heldout_text=test_text, limit=limit)[
        "docs_lastword"
    ]
    result["lastword"], result["lastword_stderr"] = lastword.value, lastword.stderr
    result["lastword_examples"] = min(limit, len(build_examples(test_text)))
    flops = count_flops(model, 512)
    result.update(flops_dense=flops.dense, flops_pruned=flops.sparse, params_nonzero=count_params(model).nonzero)
    return result


def with_ci(row: dict, key: str) -> str:
    return interval(row[key], row[f"{key}_ci95"])


def table(rows: list[dict]) -> str:
    lines = [
        "| method | sparsity | test perplexity [95% CI] | moby-dick [95% CI] | last-word acc ± stderr | "
        "FLOPs (pruned / dense) | nonzero params | prune time (s) | peak RSS while pruning (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['sparsity']} | {with_ci(row, 'perplexity')} | "
            f"{with_ci(row, 'ood_perplexity')} | "
            f"{row['lastword']:.3f} ± {row['lastword_stderr']:.3f} | "
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
    # (v2: the test / validation / train parts and the out-of-domain text; v1 points measured another protocol)
    done = Path(args.cache) / f"v2-calib{args.calibration_samples}-limit{args.limit}-threads{args.threads}"
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
    command = (
        f"python benchmarks/oneshot.py --calibration-samples {args.calibration_samples} --limit {args.limit} "
        f"--threads {args.threads}"
    )
    body = (
        f"## One-shot pruning of SmolLM2-135M\n\nCommand: `{command}` "
        f"({args.calibration_samples} x 512 calibration tokens, 2-core CPU, {args.threads} torch thread(s), "
        f"float32). Perplexity over the test part (the last 10%) of the embedded CPython documentation "
        f"({rows[0]['perplexity_windows']} windows of 512 tokens) and of moby-dick, out of domain "
        f"({rows[0]['ood_perplexity_windows']} windows), [95% CI] from a bootstrap over windows; calibration "
        "draws from the train part only; last-word accuracy ± lm-eval's standard error on the "
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
