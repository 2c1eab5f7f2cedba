"""Depth pruning of SmolLM2-135M (issue 23 part 2) beside width pruning at the same parameter count.

Rows, each an exported (physically smaller) model:
- `depth`: `--remove` of the 30 blocks removed (ShortGPT importance on `--calibration` windows of the docs' TRAIN
  part, the set chosen greedily on `--selection` windows of the VALIDATION part, `--candidates` per step);
- `structured`: one-shot structured pruning (activation score, the same share of head units and neurons in
  every layer) to the share of the parameters depth removed;
- `depth + structured`: half as many blocks removed, structured width to the same share of the whole model;
- `vib` (with `--vib-run DIR`, repeatable): an existing `prune run` directory of VIB (~35 min of mask training on
  one core), e.g. `prune run recipes/smollm2-135m/vib-30.yaml --set method.target.params=0.16 --set output=DIR`
  for the share depth removes; its parameter count is printed beside depth's.
Every perplexity is measured on the first `--windows` windows of the TEST part of the docs and of every default
extra text (moby-dick, sotu), with a 95% bootstrap interval over windows, each labelled seen / not seen by that
row's calibration or training (prune.data.seen; a VIB row's from its report.json). Latency: dense and every
exported model timed in turn in this one process (`--latency-rounds` interleaved rounds; per model the medians
over rounds, wall clock and CPU time), prefill tokens/s and decode ms/token at batch 1, on `--threads` threads.
Writes benchmarks/depth.json and the `depth` section of benchmarks/RESULTS.md.

    python benchmarks/depth.py --threads 1                       # ~15 min on one free core
    python benchmarks/depth.py --threads 1 --vib-run runs/vib-16 # with a VIB run at the same size
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import interval, seen_in_report, seen_label, write_section
from benchmarks.vib import measured
from eval.flops import count_params
from eval.latency import measure_latency
from eval.perplexity import perplexity
from prune import attach, export, method_config
from prune.data.config import EXTRA_TEXTS
from prune.data.seen import seen_texts
from prune.data.text import EMBEDDED_DOCS, DataConfig, prepare_extra, prepare_source
from prune.runs.loading import load_model
from prune.structural.shrink import has_layer_sizes, load_resized

HERE = Path(__file__).parent
JSON = HERE / "depth.json"
MODEL = "smollm2-135m"
CHECK_WINDOWS = 2  # test windows on which the export must reproduce the gated model's perplexity
DOCS_SEEN = seen_texts(EMBEDDED_DOCS, [], [EMBEDDED_DOCS, *EXTRA_TEXTS], reads=True)  # what depth/structured read


def prune_row(label: str, config, data: dict, texts: dict, dense_params: int) -> tuple[dict, torch.nn.Module]:
    """One method on a fresh SmolLM2: attached (timed), exported (checked against the gates), measured; sizes and
    the depth record."""
    model, _ = load_model(MODEL)
    start = time.perf_counter()
    attach(model, config, data["calibration"], data["selection"])
    seconds = time.perf_counter() - start
    gated = perplexity(model, texts["perplexity"][:CHECK_WINDOWS]).value
    exported = export(model, config)
    check = perplexity(exported, texts["perplexity"][:CHECK_WINDOWS]).value
    assert abs(check - gated) <= 1e-4 * gated, f"the export ({check}) computes another model than the gates ({gated})"
    summary = exported.maskprune_summary
    row = {
        "method": label,
        "config": config.model_dump(mode="json"),
        **measured(exported, texts),
        "params_kept": count_params(exported).total,
        "layers_kept": exported.config.num_hidden_layers,
        "prune_seconds": seconds,
        "kept_layers": summary["kept_layers"],
        "depth": summary.get("depth"),
        "seen": DOCS_SEEN,
    }
    assert row["params_kept"] == summary["params"]["kept"]
    row["params_removed"] = 1.0 - row["params_kept"] / dense_params
    return row, exported


def vib_row(directory: str, texts: dict, dense_params: int) -> tuple[dict, torch.nn.Module]:
    model, _ = load_model(directory)
    report = json.loads((Path(directory) / "report.json").read_text())
    row = {
        "method": f"vib ({directory})",
        **measured(model, texts),
        "seen": seen_in_report(report, DOCS_SEEN, EMBEDDED_DOCS),
        "params_kept": count_params(model).total,
        "layers_kept": model.config.num_hidden_layers,
    }
    row["params_removed"] = 1.0 - row["params_kept"] / dense_params
    return row, model


def cached(directory: Path, make) -> tuple[dict, torch.nn.Module]:
    """A row and its exported model: from `directory` when an earlier run with the same settings left them there
    (so a rerun only times them again), else made by `make()` and saved (row.json last: it means complete)."""
    if (directory / "row.json").is_file():
        model_dir = directory / "model"
        model = (
            load_resized(model_dir) if has_layer_sizes(model_dir) else AutoModelForCausalLM.from_pretrained(model_dir)
        )
        return json.loads((directory / "row.json").read_text()), model.eval()
    row, model = make()
    model.save_pretrained(directory / "model")
    (directory / "row.json").write_text(json.dumps(row, indent=2))
    return row, model


def latencies(models: dict[str, torch.nn.Module], args) -> dict[str, dict]:
    """Every model timed in turn, round after round (`latency_rounds`, each the median of 3 runs). A neighbour's load
    on a shared CPU slows whatever runs at that moment, so a model's speedup is the median over rounds of its ratio
    to the dense model timed in the same round, and its figures are medians over rounds."""
    runs: dict[str, list] = {label: [] for label in models}
    for _ in range(args.latency_rounds):
        for label, model in models.items():
            result = measure_latency(model, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, repeats=3)
            runs[label].append((result.prefill_tokens_per_s, result.decode_ms_per_token))
    dense = runs["dense"]
    return {
        label: {
            "prefill_tokens_per_s": statistics.median(value[0] for value in values),
            "decode_ms_per_token": statistics.median(value[1] for value in values),
            "speedup_prefill": statistics.median(value[0] / base[0] for value, base in zip(values, dense)),
            "speedup_decode": statistics.median(base[1] / value[1] for value, base in zip(values, dense)),
            "rounds": values,
        }
        for label, values in runs.items()
    }


@torch.no_grad()
def cpu_seconds(model: torch.nn.Module, prompt: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """CPU time of this process for one prefill of `prompt` and for `decode_tokens` greedy steps with the KV cache:
    on a shared machine, what the model costs without the time it waited for a core."""
    start = time.process_time()
    output = model(input_ids=prompt, use_cache=True)
    prefill = time.process_time() - start
    start = time.process_time()
    for _ in range(decode_tokens):
        token = output.logits[:, -1:].argmax(dim=-1)
        output = model(input_ids=token, past_key_values=output.past_key_values, use_cache=True)
    return prefill, time.process_time() - start


def cpu_latencies(models: dict[str, torch.nn.Module], args) -> dict[str, dict]:
    """Per model the median CPU time of `latency_rounds` interleaved runs (after one warm-up each): prefill tokens
    per CPU second, decode CPU ms/token, and their ratios to the dense model's."""
    prompt = torch.randint(0, 1000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    runs: dict[str, list] = {label: [] for label in models}
    for model in models.values():  # warm-up
        cpu_seconds(model, prompt, args.decode_tokens)
    for _ in range(args.latency_rounds):
        for label, model in models.items():
            runs[label].append(cpu_seconds(model, prompt, args.decode_tokens))
    figures = {
        label: {
            "prefill_tokens_per_cpu_s": args.prompt_len / statistics.median(value[0] for value in values),
            "decode_cpu_ms_per_token": 1000 * statistics.median(value[1] for value in values) / args.decode_tokens,
            "rounds": values,
        }
        for label, values in runs.items()
    }
    for entry in figures.values():
        entry["speedup_prefill"] = entry["prefill_tokens_per_cpu_s"] / figures["dense"]["prefill_tokens_per_cpu_s"]
        entry["speedup_decode"] = figures["dense"]["decode_cpu_ms_per_token"] / entry["decode_cpu_ms_per_token"]
    return figures


def key(text: str) -> str:
    """Where a row holds the perplexity of `text`: the docs' under `perplexity`, an extra text's under its name."""
    return "perplexity" if text == EMBEDDED_DOCS else text


def cell(row: dict, text: str) -> str:
    """A perplexity with its interval and, for a pruned row, the row's seen / not seen label for that text."""
    value = interval(row[key(text)], row[f"{key(text)}_ci95"])
    return value + (seen_label(row["seen"][text]) if "seen" in row else "")


def render(results: dict) -> str:
    d, a = results["dense"], results["args"]
    texts = [EMBEDDED_DOCS, *EXTRA_TEXTS]
    header = " | ".join(f"{'test perplexity' if text == EMBEDDED_DOCS else text} [95% CI] | x dense" for text in texts)
    lines = [
        "## Depth pruning of SmolLM2-135M beside width pruning at the same parameter count",
        "",
        f"Command: `{results['command']}`",
        "",
        (
            f"SmolLM2-135M, float32, {a['threads']} thread(s). Perplexity on the first {a['windows']} windows of "
            f"{a['seq_len']} tokens of the test part of the embedded CPython docs and of {', '.join(EXTRA_TEXTS)}, "
            "[95% CI] from a bootstrap over windows, each labelled seen / not seen by that row's calibration or "
            "training (derived from the data it read). Depth: ShortGPT block importance on "
            f"{a['calibration']} windows of the docs' train part, the removal set chosen greedily on the validation "
            f"loss of {a['selection']} windows of the docs' validation part ({a['candidates']} lowest-importance "
            "candidates per step, checked against the score-only set). Structured: one-shot, activation score "
            f"({a['calibration']} train windows), the same share of head units and neurons in every layer, "
            "allocated to the share of the parameters depth removed. Depth + structured: half as many blocks, "
            "then structured to the same whole-model share. Dense: "
            + ", ".join(f"{text} {cell(d, text)}" for text in texts)
            + f"; {d['params']:,} parameters, {d['layers']} blocks."
        ),
        "",
        f"| model | blocks | params kept | removed | {header} |",
        "|---|---|---|---|" + "---|---|" * len(texts),
    ]
    dense_row = {**d, "method": "dense", "layers_kept": d["layers"], "params_kept": d["params"], "params_removed": 0.0}
    for row in [dense_row, *results["rows"]]:
        ratios = " | ".join(f"{cell(row, text)} | {row[key(text)] / d[key(text)]:.2f}" for text in texts)
        lines.append(
            f"| {row['method']} | {row['layers_kept']} | {row['params_kept']:,} | {row['params_removed']:.3f} | "
            f"{ratios} |"
        )
    lines += ["", *record_lines(results["rows"]), *speed_lines(results), "", *verdict_lines(results)]
    for note in results.get("notes", []):
        lines += [note, ""]
    return "\n".join(lines)


def speed_lines(results: dict) -> list[str]:
    """Wall-clock and CPU-time speed of every export beside the dense model's, measured in this process."""
    a, load = results["args"], results["load_average"]
    wall, cpu = results["latency"], results["cpu_time"]
    lines = [
        (
            f"Speed at batch 1, prompt {a['prompt_len']} tokens, {a['decode_tokens']} decoded, {a['threads']} "
            f"thread(s), every model in turn in this process, {a['latency_rounds']} interleaved rounds. Wall clock "
            "(eval.latency, the median of 3 runs per round): the figures are medians over rounds, a speedup the "
            "median of the per-round ratios to the dense model. CPU time (this process's, one run per round, "
            "medians): what each model costs without the time it waited for a core, the steadier figure on this "
            f"shared 2-core machine (load average {load['before_latency'][0]:.1f} before timing, "
            f"{load['after_latency'][0]:.1f} after)."
        ),
        "",
        "| model | prefill tok/s | speedup | decode ms/token | speedup | prefill tok/CPU-s | speedup | decode CPU "
        "ms/token | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in ["dense", *(row["method"] for row in results["rows"])]:
        w, c = wall[label], cpu[label]
        lines.append(
            f"| {label} | {w['prefill_tokens_per_s']:.0f} | {w['speedup_prefill']:.2f}x | "
            f"{w['decode_ms_per_token']:.1f} | {w['speedup_decode']:.2f}x | {c['prefill_tokens_per_cpu_s']:.0f} | "
            f"{c['speedup_prefill']:.2f}x | {c['decode_cpu_ms_per_token']:.1f} | {c['speedup_decode']:.2f}x |"
        )
    lines += ["", f"Every export reproduces its gated model's perplexity (checked on {CHECK_WINDOWS} test windows)."]
    return lines


def record_lines(rows: list[dict]) -> list[str]:
    """Which blocks each depth row removed, their importance rank, and how the validation search chose."""
    lines = []
    for row in rows:
        depth = row.get("depth")
        if not depth:
            continue
        ranked = sorted(range(len(depth["importance"])), key=lambda block: depth["importance"][block])
        evaluations = sum(len(step["tried"]) for step in depth["steps"]) + ("score_only_loss" in depth)
        if set(depth["greedy"]) == set(depth["score_only"]):
            choice = "the greedy search found the score-only set"
        elif set(depth["removed"]) == set(depth["greedy"]):
            choice = f"greedy kept (score-only set: validation perplexity {math.exp(depth['score_only_loss']):.2f})"
        else:
            choice = f"score-only kept (greedy set: validation perplexity {math.exp(depth['greedy_loss']):.2f})"
        lines.append(
            f"{row['method']}: removed blocks {depth['removed']} (kept {row['kept_layers']}); the 8 lowest-importance "
            f"blocks, lowest first: {ranked[:8]}; score-only set {sorted(depth['score_only'])}, greedy set "
            f"{sorted(depth['greedy'])}: {choice}; chosen set's validation perplexity "
            f"{math.exp(depth['loss']):.2f} vs dense {math.exp(depth['dense_loss']):.2f}, "
            f"{evaluations} validation evaluations, {row['prune_seconds']:.0f} s to choose."
        )
        lines.append("")
    return lines


def verdict_lines(results: dict) -> list[str]:
    """Which row wins on test perplexity at (about) the same parameter count, per text (intervals compared; a
    text the rows never read is what says how the model does elsewhere), and which decodes fastest."""
    rows, lines = results["rows"], []
    for text in [EMBEDDED_DOCS, *EXTRA_TEXTS]:
        best = min(rows, key=lambda row: row[key(text)])
        others = [row for row in rows if row is not best]
        apart = [row["method"] for row in others if row[f"{key(text)}_ci95"][0] > best[f"{key(text)}_ci95"][1]]
        overlapping = [row["method"] for row in others if row["method"] not in apart]
        lines.append(
            f"Lowest test perplexity on {text}: {best['method']} ({cell(best, text)})"
            + (f"; intervals apart from {', '.join(apart)}" if apart else "")
            + (f"; intervals overlap with {', '.join(overlapping)}" if overlapping else "")
            + "."
        )
        lines.append("")
    cpu = results["cpu_time"]
    fastest = max(rows, key=lambda row: cpu[row["method"]]["speedup_decode"])
    lines.append(
        f"Fastest decode (CPU time): {fastest['method']}; CPU-time speedups (prefill, decode): "
        + "; ".join(
            f"{row['method']} {cpu[row['method']]['speedup_prefill']:.2f}x, {cpu[row['method']]['speedup_decode']:.2f}x"
            for row in rows
        )
        + "."
    )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remove", type=float, default=0.2, help="share of the blocks removed")
    parser.add_argument("--candidates", type=int, default=3, help="blocks tried on validation per greedy step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=16, help="test windows per text for perplexity")
    parser.add_argument("--calibration", type=int, default=32, help="train windows: block importance, activations")
    parser.add_argument("--selection", type=int, default=8, help="validation windows the choice of blocks reads")
    parser.add_argument("--vib-run", action="append", default=[], help="a VIB `prune run` directory to compare")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument(
        "--cache",
        default=str(HERE.parent / "runs" / "bench-depth"),
        help="where pruned rows and their exported models are kept (a rerun with the same settings only times them)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", action="append", default=[], help="a line added under the table")
    parser.add_argument("--render", action="store_true", help="only rewrite the section from depth.json")
    args = parser.parse_args(argv)
    if args.render:
        print(f"wrote {write_section('depth', render(json.loads(JSON.read_text())))}")
        return
    torch.set_num_threads(args.threads)
    command = "python benchmarks/depth.py " + " ".join(
        shlex.quote(arg) for arg in (argv if argv is not None else sys.argv[1:])
    )
    start = time.perf_counter()
    dense, tokenizer = load_model(MODEL)
    splits = prepare_source(tokenizer, DataConfig(seq_len=args.seq_len))
    extra = prepare_extra(tokenizer, list(EXTRA_TEXTS), args.seq_len)
    texts = {
        "perplexity": splits.test_blocks(args.seq_len)[: args.windows],
        **{name: extra[name].test_blocks(args.seq_len)[: args.windows] for name in EXTRA_TEXTS},
    }
    data = {
        "calibration": splits.calibration_blocks(args.calibration, args.seq_len, 0),
        "selection": splits.validation_blocks(args.seq_len)[: args.selection],
    }
    dense_params = count_params(dense).total
    results = {"command": command, "args": vars(args), "rows": [], "notes": args.note}
    results["dense"] = {**measured(dense, texts), "params": dense_params, "layers": dense.config.num_hidden_layers}
    models = {"dense": dense}
    settings = ("remove", "candidates", "seq_len", "calibration", "selection", "windows")
    cache = Path(args.cache) / "-".join([*(f"{key}{getattr(args, key)}" for key in settings), *EXTRA_TEXTS])

    def add(row: dict, model: torch.nn.Module) -> None:
        results["rows"].append(row)
        models[row["method"]] = model
        JSON.write_text(json.dumps(results, indent=2))
        test = interval(row["perplexity"], row["perplexity_ci95"])
        print(f"{row['method']}: {row['params_removed']:.3f} removed, test perplexity {test}")

    depth = method_config("depth", remove=args.remove, candidates=args.candidates)
    add(*cached(cache / "depth", lambda: prune_row("depth", depth, data, texts, dense_params)))
    share = results["rows"][0]["params_removed"]
    structured = method_config("structured", score="activation", target={"params": share})
    add(*cached(cache / "structured", lambda: prune_row("structured", structured, data, texts, dense_params)))
    blocks = len(results["rows"][0]["depth"]["removed"]) // 2
    combined = method_config(
        "depth", remove=blocks, candidates=args.candidates, width={"score": "activation", "target": {"params": share}}
    )
    label = f"depth {blocks} blocks + structured"
    add(*cached(cache / "depth-structured", lambda: prune_row(label, combined, data, texts, dense_params)))
    for directory in args.vib_run:
        add(*vib_row(directory, texts, dense_params))
    results["load_average"] = {"before_latency": os.getloadavg()}
    results["latency"] = latencies(models, args)
    results["cpu_time"] = cpu_latencies(models, args)
    results["load_average"]["after_latency"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - start
    JSON.write_text(json.dumps(results, indent=2))
    print(f"wrote {write_section('depth', render(results))}")


if __name__ == "__main__":
    main()
