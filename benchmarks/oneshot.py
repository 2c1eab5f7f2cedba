"""One-shot baselines on SmolLM2-135M: dense, magnitude, Wanda, SparseGPT at 50% and 2:4; 2:4 against llm-compressor.

For each point: perplexity (512-token windows) on the test part of the embedded CPython docs and of the other
texts every run measures (eval.extra_texts' default: moby-dick and the never-seen sotu), each with its 95%
bootstrap interval over windows and labelled seen / not seen by that point's calibration (prune.data.seen: the
docs, for the methods that calibrate); last-word accuracy with lm-eval's standard error; FLOPs; the wall time of
the pruning step; the process's peak memory after pruning and after the perplexities. Calibration reads the train
part only. Each point runs in its own process so peak memory is its own; all points run in one invocation, side by
side (finished points are kept under --cache, so an interrupted run resumes). Writes the `oneshot` section of
benchmarks/RESULTS.md.

    python benchmarks/oneshot.py [--calibration-samples 128] [--limit 200] [--threads 1]

With `--peer-python ENV/bin/python` it measures instead, for Wanda and SparseGPT at 2:4 (`--peer-methods`), three
processes back to back: MaskPrune's point; llm-compressor's (PyPI `llmcompressor`, which pins its own transformers,
so it lives in its own virtualenv: benchmarks/peer_llmcompressor.py runs there) on the very calibration blocks and
test windows the point read, scored by the same `eval.perplexity`; and `prune run` of
recipes/smollm2-135m/<method>-2of4.yaml at the same calibration settings, whose peak covers a whole run (dense
baseline, last-word accuracy, FLOPs and latency too). Writes the `oneshot-peer` section. When that python cannot
import llmcompressor, llm-compressor's rows are skipped and the section says why.

    python benchmarks/oneshot.py --calibration-samples 64 --threads 1 --peer-python /work/peer-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from peer_llmcompressor import nm_violations  # noqa: E402
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


PEER_METHODS = ("wanda", "sparsegpt")  # compared at 2:4 with llm-compressor's WandaPruningModifier / SparseGPTModifier
PEER_SCRIPT = Path(__file__).with_name("peer_llmcompressor.py")
RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m"
SEQ_LEN = 512


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def measure_point(
    label: str, method: str, sparsity: str | None, extra: dict, calibration_samples: int, limit: int, threads: int
) -> dict:
    """Load, prune (timed, peak memory), export as a run does, evaluate: one point, in this process."""
    import torch

    torch.set_num_threads(threads)
    from eval.accuracy import accuracy_scores
    from eval.flops import count_flops, count_params
    from eval.lastword import build_examples
    from eval.perplexity import perplexity
    from prune.data.config import EXTRA_TEXTS
    from prune.data.seen import seen_texts
    from prune.data.text import prepare, prepare_extra
    from prune.methods.registry import get_method
    from prune.runs.loading import load_model
    from prune.runs.recipe import parse_recipe

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    splits = prepare(tokenizer, "embedded-docs")
    extra_texts = prepare_extra(tokenizer, list(EXTRA_TEXTS), SEQ_LEN)
    result = {"method": label, "sparsity": sparsity or "-"}
    calibrates = method != "dense" and get_method(method).needs_calibration
    result["seen"] = seen_texts("embedded-docs", [], ["embedded-docs", *EXTRA_TEXTS], reads=calibrates)
    if method != "dense":
        recipe = parse_recipe({"method": {"name": method, "sparsity": sparsity, **extra}})
        spec = get_method(method)
        calibration = splits.calibration_blocks(calibration_samples, SEQ_LEN, 0) if spec.needs_calibration else None
        before = rss_mb()
        start = time.perf_counter()
        spec.attach(model, recipe.method, calibration)
        result["prune_seconds"] = time.perf_counter() - start
        result["prune_peak_rss_mb"] = peak_rss_mb()
        result["prune_added_rss_mb"] = result["prune_peak_rss_mb"] - before
        model = spec.export(model, recipe.method)
        if recipe.method.pattern.is_nm:  # the check llm-compressor's rows get
            result["nm_violations"] = nm_violations(model, recipe.method.pattern.n, recipe.method.pattern.m)
    windows = {"embedded-docs": splits.test_blocks(SEQ_LEN)}
    windows |= {name: text.test_blocks(SEQ_LEN) for name, text in extra_texts.items()}
    result |= scored({name: perplexity(model, blocks) for name, blocks in windows.items()})
    result["perplexity_peak_rss_mb"] = peak_rss_mb()  # what llm-compressor's rows measure: pruning + perplexities
    test_text = splits.test_text(tokenizer)
    lastword = accuracy_scores(model, tokenizer, ["docs_lastword"], heldout_text=test_text, limit=limit)[
        "docs_lastword"
    ]
    result["lastword"], result["lastword_stderr"] = lastword.value, lastword.stderr
    result["lastword_examples"] = min(limit, len(build_examples(test_text)))
    flops = count_flops(model, SEQ_LEN)
    result.update(flops_dense=flops.dense, flops_pruned=flops.sparse, params_nonzero=count_params(model).nonzero)
    return result


def scored(results: dict) -> dict:
    """A row's perplexity fields from each text's PerplexityResult (the docs first, then the extra texts): the
    docs' as `perplexity`, `perplexity_ci95`, `perplexity_windows`; the others under `extra_texts`."""
    from eval.bootstrap import perplexity_ci

    figures = {
        name: {
            "value": result.value,
            "ci95": perplexity_ci(result.window_nll, result.window_tokens),
            "windows": result.windows,
        }
        for name, result in results.items()
    }
    docs = figures.pop("embedded-docs")
    return {
        "perplexity": docs["value"],
        "perplexity_ci95": docs["ci95"],
        "perplexity_windows": docs["windows"],
        "extra_texts": figures,
    }


def cached_point(done: Path, index: int, args: argparse.Namespace) -> dict:
    """POINTS[index] measured in its own process (its peak memory is its own), or as saved by an earlier run."""
    saved = done / f"point-{index}.json"
    if not saved.is_file():
        command = [sys.executable, __file__, "--point", str(index), "--threads", str(args.threads)]
        command += ["--calibration-samples", str(args.calibration_samples), "--limit", str(args.limit)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        saved.write_text(output.strip().splitlines()[-1])
    return json.loads(saved.read_text())


def cached(path: Path, measure, *arguments) -> dict:
    """The row saved at `path`, or `measure(*arguments)` saved there first: an interrupted benchmark resumes."""
    if not path.is_file():
        path.write_text(json.dumps(measure(*arguments)))
    return json.loads(path.read_text())


def write_peer_tokens(path: Path, calibration_samples: int) -> None:
    """The calibration blocks and each text's test windows MaskPrune's points read, for llm-compressor's process."""
    from safetensors.torch import save_file

    from prune.data.config import EXTRA_TEXTS
    from prune.data.text import prepare, prepare_extra
    from prune.models.loading import load_tokenizer
    from prune.runs.placed import local_model_dir

    tokenizer = load_tokenizer(str(local_model_dir("smollm2-135m")))  # the cached alias the points loaded
    splits = prepare(tokenizer, "embedded-docs")
    tokens = {"calibration": splits.calibration_blocks(calibration_samples, SEQ_LEN, 0)}
    tokens["embedded-docs"] = splits.test_blocks(SEQ_LEN)
    for name, text in prepare_extra(tokenizer, list(EXTRA_TEXTS), SEQ_LEN).items():
        tokens[name] = text.test_blocks(SEQ_LEN)
    save_file({key: value.contiguous() for key, value in tokens.items()}, str(path))


def peer_missing(peer_python: str) -> str | None:
    """Why llm-compressor's rows cannot run (None: they can)."""
    try:
        subprocess.run([peer_python, "-c", "import llmcompressor"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return f"{peer_python} cannot import llmcompressor"
    return None


def measure_peer(peer_python: str, method: str, tokens: Path, threads: int, seen: dict) -> dict:
    """llm-compressor's 2:4 row: its own process (benchmarks/peer_llmcompressor.py), scored here like ours; `seen`
    labels its texts as our point's (the same calibration blocks)."""
    from eval.perplexity import perplexity_of
    from prune.runs.placed import local_model_dir

    command = [peer_python, str(PEER_SCRIPT), "--model", str(local_model_dir("smollm2-135m"))]
    command += ["--tokens", str(tokens), "--method", method, "--pattern", "2:4", "--threads", str(threads)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment).stdout
    peer = json.loads(output.strip().splitlines()[-1])
    row = {"method": f"llm-compressor {method}", "seen": seen}
    row |= {key: peer[key] for key in ("nm_violations", "prune_seconds", "prune_peak_rss_mb")}
    row["perplexity_peak_rss_mb"] = peer["peak_rss_mb"]
    return row | scored({name: perplexity_of(nll, SEQ_LEN, name) for name, nll in peer["window_nll"].items()})


def measure_run(method: str, calibration_samples: int, threads: int, directory: Path) -> dict:
    """`prune run` of the method's 2:4 recipe at these calibration settings (its default evaluation, dense baseline
    included): its process's peak RSS (getrusage, what `/usr/bin/time -v` reports), prune time and perplexities."""
    recipe = RECIPES / f"{method}-2of4.yaml"
    command = [sys.executable, "-m", "prune.cli", "run", str(recipe), "--output", str(directory), "--overwrite"]
    command += ["--set", f"data.calibration_samples={calibration_samples}", "--set", f"runtime.threads={threads}"]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, check=True, capture_output=True, env=environment)
    report = json.loads((directory / "report.json").read_text())
    texts = {name: text["perplexity"] for name, text in report["extra_texts"].items()}
    return {
        "method": method,
        "peak_rss_mb": report["memory"]["peak_rss_mb"],
        "prune_seconds": report["timings"]["prune"],
        "perplexity": report["perplexity"]["value"],
        "perplexity_ci95": report["perplexity"]["ci95"],
        "extra_texts": {name: {"value": text["value"], "ci95": text["ci95"]} for name, text in texts.items()},
    }


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
        "peak RSS after pruning (MB) | peak RSS after the perplexities (MB) |",
        "|---|---|---|" + "---|" * len(texts) + "---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['sparsity']} | {with_ci(row, 'embedded-docs')} | "
            + "".join(f"{with_ci(row, name)} | " for name in texts)
            + f"{row['lastword']:.3f} ± {row['lastword_stderr']:.3f} | "
            f"{row['flops_pruned'] / 1e9:.1f} G / {row['flops_dense'] / 1e9:.1f} G | "
            f"{row['params_nonzero'] / 1e6:.1f} M | "
            + (
                f"{row['prune_seconds']:.0f} | {row['prune_peak_rss_mb']:.0f} | "
                if "prune_seconds" in row
                else "- | - | "
            )
            + f"{row['perplexity_peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def peer_table(compared: list[tuple[str, dict, dict | None, dict]]) -> str:
    """Each 2:4 method: MaskPrune's point, llm-compressor's and MaskPrune's whole `prune run`, one row each."""
    texts = list(compared[0][1]["extra_texts"])
    lines = [
        "| method (2:4) | process | test perplexity [95% CI] | "
        + "".join(f"{name} [95% CI] | " for name in texts)
        + "exactly 2:4 | prune time (s) | peak RSS after pruning (MB) | peak RSS at the end (MB) |",
        "|---|---|---|" + "---|" * len(texts) + "---|---|---|---|",
    ]
    for method, ours, peer, run in compared:
        sides = [("MaskPrune: prune, perplexities", ours)]
        sides += [("llm-compressor 0.14: prune, perplexities", peer)] if peer is not None else []
        for side, row in sides:
            exact = "yes" if row["nm_violations"] == 0 else f"no ({row['nm_violations']} groups)"
            lines.append(
                f"| {method} | {side} | {with_ci(row, 'embedded-docs')} | "
                + "".join(f"{with_ci(row, name)} | " for name in texts)
                + f"{exact} | {row['prune_seconds']:.0f} | {row['prune_peak_rss_mb']:.0f} | "
                f"{row['perplexity_peak_rss_mb']:.0f} |"
            )
        lines.append(
            f"| {method} | MaskPrune `prune run` (dense baseline, accuracy, FLOPs, latency too) | "
            f"{with_ci(run, 'embedded-docs')} | "
            + "".join(f"{with_ci(run, name)} | " for name in texts)
            + f"- | {run['prune_seconds']:.0f} | - | {run['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def verdicts(compared: list[tuple[str, dict, dict | None, dict]]) -> str:
    """One sentence per method: each MaskPrune peak against llm-compressor's, said plainly when it is higher."""
    sentences = []
    for method, ours, peer, run in compared:
        if peer is None:
            continue
        target = peer["perplexity_peak_rss_mb"]
        peaks = [
            f"{label} {value:.0f} MB ({value - target:+.0f} MB, {'not above' if value <= target else 'ABOVE'} it)"
            for label, value in (("the point's", ours["perplexity_peak_rss_mb"]), ("a whole run's", run["peak_rss_mb"]))
        ]
        quality = ", ".join(
            f"{name} {ours['extra_texts'][name]['value']:.2f} vs {peer['extra_texts'][name]['value']:.2f}"
            for name in ours["extra_texts"]
        )
        sentences.append(
            f"{method}: against llm-compressor's {target:.0f} MB, MaskPrune's peak is {peaks[0]}, {peaks[1]}; "
            f"prune time {ours['prune_seconds']:.0f} s vs {peer['prune_seconds']:.0f} s "
            f"({ours['prune_seconds'] / peer['prune_seconds']:.2f}x); perplexity (MaskPrune vs llm-compressor) "
            f"docs {ours['perplexity']:.2f} vs {peer['perplexity']:.2f}, {quality}."
        )
    return "\n\n".join(sentences)


def compare_with_peer(args: argparse.Namespace, done: Path) -> None:
    """The `oneshot-peer` section: per method, MaskPrune's point, llm-compressor's, MaskPrune's whole run."""
    missing = peer_missing(args.peer_python)
    tokens = done / "peer-tokens.safetensors"
    if missing is None and not tokens.is_file():
        write_peer_tokens(tokens, args.calibration_samples)
    compared = []
    for method in args.peer_methods:
        ours = cached_point(done, POINTS.index((method, method, "2:4", {})), args)
        peer = None
        if missing is None:
            measured = (args.peer_python, method, tokens, args.threads, ours["seen"])
            peer = cached(done / f"peer-{method}.json", measure_peer, *measured)
        run = cached(
            done / f"run-{method}.json",
            measure_run,
            method,
            args.calibration_samples,
            args.threads,
            done / f"run-{method}",
        )
        compared.append((method, ours, peer, run | {"seen": ours["seen"]}))
        print(f"{method} 2:4 measured", flush=True)
    from prune.sweep.compare import LEGEND

    command = (
        f"python benchmarks/oneshot.py --calibration-samples {args.calibration_samples} --threads {args.threads} "
        f"--peer-python {args.peer_python} --peer-methods {' '.join(args.peer_methods)}"
    )
    body = (
        f"## One-shot 2:4 against llm-compressor (SmolLM2-135M)\n\nCommand: `{command}` ({args.calibration_samples} x "
        f"512 calibration tokens from the train part of the embedded CPython docs, {args.threads} torch thread(s), "
        "float32, a 2-core CPU shared with other jobs). For each method three processes ran back to back: MaskPrune's "
        "one-shot point (load, prune, export, the perplexities), llm-compressor 0.14's (its "
        "WandaPruningModifier / SparseGPTModifier through `oneshot`, sequential pipeline, every linear of the decoder "
        "layers, SparseGPT's block size 128 and dampening 0.01 as ours; benchmarks/peer_llmcompressor.py in its own "
        "virtualenv) on the same calibration blocks and test windows, scored by the same `eval.perplexity`; and "
        "MaskPrune's `prune run` of recipes/smollm2-135m/<method>-2of4.yaml at the same calibration settings. "
        f"Perplexity over the test part of the docs and of every default extra text, [95% CI] from a bootstrap over "
        f"windows; {LEGEND} Exactly 2:4: no group of 4 inputs of any decoder linear holds more than 2 nonzeros. Peak "
        "RSS is the process's (getrusage, what `/usr/bin/time -v` reports), read after pruning and at the end.\n\n"
        + peer_table(compared)
        + "\n\n"
        + (verdicts(compared) if missing is None else f"llm-compressor's rows were skipped ({missing}).")
        + "".join(f"\n\n{note}" for note in args.note)
    )
    print(peer_table(compared))
    print(f"written to {write_section('oneshot-peer', body)}")


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
    parser.add_argument(
        "--peer-python",
        help="python of a virtualenv with llm-compressor (e.g. /work/peer-venv/bin/python): measure the 2:4 "
        "comparison with it instead of the points (section oneshot-peer)",
    )
    parser.add_argument("--peer-methods", nargs="+", choices=PEER_METHODS, default=list(PEER_METHODS))
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point is not None:
        print(json.dumps(measure_point(*POINTS[args.point], args.calibration_samples, args.limit, args.threads)))
        return
    # finished points are kept per setting, so an interrupted benchmark resumes where it stopped
    # (v4: peak RSS after the perplexities, the N:M check; v3 points lack them, v2 measured moby-dick alone)
    done = Path(args.cache) / f"v4-calib{args.calibration_samples}-limit{args.limit}-threads{args.threads}"
    done.mkdir(parents=True, exist_ok=True)
    if args.peer_python is not None:
        compare_with_peer(args, done)
        return
    rows = []
    for index, (label, _, sparsity, _) in enumerate(POINTS):
        rows.append(cached_point(done, index, args))
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
        "prune time is the pruning step alone; peak RSS is the process's (getrusage), read after pruning (model and "
        "data loaded before) and after the perplexities. Against llm-compressor: section `oneshot-peer`.\n\n"
        + table(rows)
        + "".join(f"\n\n{note}" for note in args.note)
    )
    print(table(rows))
    print(f"written to {write_section('oneshot', body)}")


if __name__ == "__main__":
    main()
