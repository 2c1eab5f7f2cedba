"""Activation sparsity (method `activation`: TEAL and CATS) on SmolLM2-135M, float32, one thread: quality and
whole-model decode speed of the sparse model beside the dense one, in one process. Writes the `activation`
section of benchmarks/RESULTS.md and benchmarks/activation.json.

    python benchmarks/activation.py --threads 1     # ~3 h on 2 cores shared with other jobs (load 12-15)

For each level (mode and share of zeros) every variant of the method's settings (score magnitude or weighted;
for teal, allocation uniform or greedy) is calibrated on `--calibration` windows of the docs' train part and
scored on the docs' validation part; the variant with the lowest validation perplexity is kept (never a test
figure), and only it is measured on the test parts of the docs and of moby-dick and sotu (out of domain, never read
before), with 95% bootstrap intervals. Speed: decode tokens/s (prompt 128, 32 greedy tokens) and prefill
tokens/s of the same model with its thresholds bypassed (dense) and applied (sparse), alternated `--rounds`
times (prune.methods.activation.speed); ratios of medians. Every row times the same dense computation, so its
spread across the run (fastest over slowest dense decode) says whether the shared CPU's load changed under the
timings: beyond TIMING_SPREAD the speed goals are reported "not judged", since a neighbour's memory traffic slows
the dense model (which reads every weight) more than the sparse one and inflates the ratio.

With `--recover-tokens N`, each level (or each of `--recover-levels`) also gets a row "+ recovery": the kept
variant's sparse model (the same thresholds, fixed) recovered by prune.recovery -- its weights (`--recover-mode
lora`: LoRA adapters, merged; `full`: the weights themselves) trained on N tokens of the docs' train part (with
`--recover-mix`, of the docs' and those texts' train parts, window by window as under data.mix; those texts are
then seen by the recovered rows) with the thresholds in the forward, on the KL divergence from the dense model's
distribution (`--recover-distill`, the rest cross-entropy) -- the best of its periodic validation scores kept (the
validation parts of the texts it trained on), then measured as the level is: test figures, zeroed shares, dense vs
sparse speed side by side (the dense model: the recovered weights, thresholds bypassed).

Then the kernel alone: y = W x for SmolLM2's projection shapes at given shares of zeros, dense (F.linear) against
each way to read only the kept columns (the C++ kernel, embedding_bag, index_select + mm, torch.compile of the
gather), cycling through enough matrices that none stays in cache. And the batch sweep: whole-model decode of B
sequences at once, sparse (the kernel forced on) against dense, to find where the union of the kept columns of
B tokens stops paying (method.max_tokens is set from it).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import interval, seen_label, write_section  # noqa: E402
from eval.bootstrap import perplexity_ci  # noqa: E402
from eval.perplexity import perplexity  # noqa: E402
from prune import method_config  # noqa: E402
from prune.data.config import EMBEDDED_DOCS, GENERAL, MOBY_DICK, SOTU  # noqa: E402
from prune.data.seen import seen_texts  # noqa: E402
from prune.data.text import DataConfig, interleave, prepare, prepare_extra, prepare_mix  # noqa: E402
from prune.masks.base import unwrap  # noqa: E402
from prune.methods.activation import kernel  # noqa: E402
from prune.methods.activation.layers import (  # noqa: E402
    Threshold,
    ThresholdedFFN,
    bypassed,
    entries,
    thresholded,
    wrap,
)
from prune.methods.activation.method import ACTIVATION, measure_zeroed  # noqa: E402
from prune.methods.activation.speed import side_by_side  # noqa: E402
from prune.recovery.config import RecoverConfig  # noqa: E402
from prune.recovery.stage import recover  # noqa: E402
from prune.runs.loading import load_model  # noqa: E402
from prune.tasks.causal_lm import distillation_loss  # noqa: E402

HERE = Path(__file__).resolve().parent
JSON = HERE / "activation.json"
EXTRA_TEXTS = (MOBY_DICK, SOTU)  # never read by the method (it calibrates on the docs' train part)
GOALS = {("cats", 0.5): (0.05, 1.2), ("teal", 0.4): (0.10, 1.3)}  # (max perplexity increase, min decode speedup)
TIMING_SPREAD = 1.25  # the dense decode's fastest over slowest across a run's rows beyond which no speed goal is judged
SHAPES = [(576, 576, "q, o"), (576, 192, "k, v"), (576, 1536, "gate, up"), (1536, 576, "down")]


def variants(mode: str) -> list[dict]:
    """The settings tried per level: cats, both scores; teal, the magnitude score with uniform and with TEAL's
    greedy allocation (the weighted score gave no better validation perplexity than magnitude at teal 40% and
    50% in trial runs, and each variant costs a calibration and a validation pass on a busy CPU)."""
    if mode == "cats":
        return [{"score": score} for score in ("magnitude", "weighted")]
    return [{"score": "magnitude", "allocation": allocation} for allocation in ("uniform", "greedy")]


def figures(model, blocks: torch.Tensor, batch: int) -> dict:
    result = perplexity(model, blocks, batch_size=batch, desc="perplexity")
    return {"value": result.value, "ci95": list(perplexity_ci(result.window_nll, result.window_tokens))}


def wrapped_weights(model) -> int:
    """How many weights the thresholds' modules hold (what `weights_skipped` is a share of)."""
    return sum(param.numel() for layer in thresholded(model).values() for param in layer.base.parameters())


def weights_read_per_token(model) -> int:
    """The weights one dense decode step reads: every parameter once (a tied LM head's matrix once), except an
    untied input embedding, of which a token reads one row."""
    read = sum(param.numel() for param in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return read if embedding is head else read - embedding.numel() + embedding.shape[1]


def decode_bound(row: dict, read: int) -> float:
    """The decode speedup if a step cost only its weight reads: the dense step reads `read` weights, the sparse
    one skips `weights_skipped` of the wrapped ones. Attention, norms and the framework's per-call work are left
    out, so a measured speedup lies below it."""
    return read / (read - row["weights_skipped"] * row["wrapped_weights"])


def ffn_weights_skipped(model, zeroed: dict) -> float:
    """The share of the FFN weights a token does not read: cats, up and down of the zeroed neurons (the gate is
    always read); teal, the columns of gate/up and down the zeroed inputs skip."""
    skipped = total = 0.0
    for name, layer in thresholded(model).items():
        share = zeroed["layers"][name]["zeroed"]
        if isinstance(layer, ThresholdedFFN):
            weights = layer.base.up_proj.weight.numel()
            skipped, total = skipped + 2 * weights * share, total + 3 * weights
        elif ".mlp." in name:
            skipped, total = skipped + layer.base.weight.numel() * share, total + layer.base.weight.numel()
    return skipped / total if total else 0.0


def parse_level(level: str) -> tuple[str, float]:
    """'teal:0.4' -> ('teal', 0.4)."""
    mode, sparsity = level.split(":")
    return mode, float(sparsity)


def run_level(model, mode: str, sparsity: float, data: dict, args, recovering: bool) -> dict:
    """Every variant calibrated and scored on validation; the best measured on test, its speed side by side (and,
    when `recovering`, the same after recovery)."""
    tried, kept = [], {}
    for settings in variants(mode):
        config = method_config("activation", mode=mode, sparsity=sparsity, **settings)
        start = time.perf_counter()
        ACTIVATION.attach(model, config, data["calibration"])
        seconds = time.perf_counter() - start
        validation = perplexity(model, data["validation"], batch_size=args.batch).value
        tried.append({**settings, "validation": validation, "calibration_s": seconds})
        kept[json.dumps(settings)] = {name: layer.mask for name, layer in thresholded(model).items()}
        print(mode, sparsity, settings, f"validation {validation:.3f}", f"calibrated in {seconds:.0f} s", flush=True)
        unwrap(model)
    best = min(tried, key=lambda row: row["validation"])
    chosen = {key: value for key, value in best.items() if key not in ("validation", "calibration_s")}
    wrap(model, kept[json.dumps(chosen)], method_config("activation").max_tokens)
    row = {"mode": mode, "sparsity": sparsity, "chosen": chosen, "variants": tried, **measured(model, data, args)}
    print(mode, sparsity, {key: row[key] for key in ("docs", *EXTRA_TEXTS, "weights_skipped", "speed")}, flush=True)
    if args.batch_sweep and (mode, sparsity) == ("teal", 0.4):
        row["batch_sweep"] = batch_sweep(model, args)
    if recovering:
        row["recovered"] = recovered(model, data, args)
    unwrap(model)
    return row


def measured(model, data: dict, args) -> dict:
    """A sparse model's test figures (docs and every extra text), what its thresholds zero, and its speed beside
    the same model with the thresholds bypassed."""
    zeroed = measure_zeroed(model, data["test"][: args.zeroed_windows])
    return {
        "docs": figures(model, data["test"], args.batch),
        **{text: figures(model, data[text], args.batch) for text in EXTRA_TEXTS},
        "weights_skipped": zeroed["weights_skipped"],
        "wrapped_weights": wrapped_weights(model),
        "ffn_weights_skipped": ffn_weights_skipped(model, zeroed),
        "layers": zeroed["layers"],
        "speed": side_by_side(model, rounds=args.rounds),
    }


def recover_config(args) -> RecoverConfig:
    """--recover-tokens as optimizer steps of --recover-batch windows, four validation scores along the way."""
    steps = max(1, args.recover_tokens // (args.recover_batch * args.seq_len))
    return RecoverConfig(
        steps=steps,
        batch_size=args.recover_batch,
        lr=args.recover_lr,
        mode=args.recover_mode,
        distill=args.recover_distill,
        eval_every=max(1, steps // 4),
        seed=args.seed,
    )


def recovered(model, data: dict, args) -> dict:
    """A copy of the sparse `model` recovered with its thresholds fixed (prune.recovery), measured as run_level
    measures the level; `model` itself stays as it was."""
    student, teacher = copy.deepcopy(model), unwrap(copy.deepcopy(model)).requires_grad_(False)
    config = recover_config(args)
    validation = data["recover_validation"][: args.recover_eval_windows]

    def task_loss(module, batch):
        return distillation_loss(module, teacher, batch, config.distill)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = recover(
            student,
            config,
            data["train"],
            run_dir,
            task_loss=task_loss,
            evaluate=lambda module: perplexity(module, validation, batch_size=args.batch).value,
        )
    seconds = time.perf_counter() - start
    row = {
        "mode": args.recover_mode,
        "tokens": config.steps * config.batch_size * args.seq_len,
        "steps": config.steps,
        "best_step": result.best_step,
        "validation": result.best_score,
        "seconds": seconds,
        **measured(student, data, args),
    }
    print("+ recovery", {key: row[key] for key in ("docs", *EXTRA_TEXTS, "best_step", "speed")}, flush=True)
    return row


def every_column(model, args, mode: str) -> dict:
    """Decode through the kernel with no entry zeroed (cut 0 on every module of `mode`: every column, every FFN
    neuron read) against dense: what the kernel and W^T layout alone change, sparsity aside."""
    names = ACTIVATION.targets(model, method_config("activation", mode=mode))
    modules = dict(model.named_modules())
    zeros = {name: Threshold(torch.zeros(entries(modules[name])), 0.0) for name in names}
    wrap(model, zeros, method_config("activation").max_tokens)
    try:
        speed = side_by_side(model, rounds=args.rounds)
    finally:
        unwrap(model)
    print(mode, "every column through the kernel", speed, flush=True)
    return speed


@torch.no_grad()
def decode_seconds(model, batch: int, steps: int) -> float:
    """Seconds per decode step of `batch` sequences after a 64-token prefill, with the KV cache."""
    generator = torch.Generator().manual_seed(batch)
    out = model(input_ids=torch.randint(0, model.config.vocab_size, (batch, 64), generator=generator), use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


def batch_sweep(model, args) -> list[dict]:
    """Whole-model decode of B sequences, the kernel serving every B (max_tokens raised), against dense."""
    layers = thresholded(model).values()
    for layer in layers:
        layer.max_tokens = max(args.batches)
    rows = []
    try:
        for batch in args.batches:
            times: dict[str, list[float]] = {"dense": [], "sparse": []}
            for round_index in range(args.rounds + 1):
                with bypassed(model):
                    dense = decode_seconds(model, batch, 16)
                sparse = decode_seconds(model, batch, 16)
                if round_index:
                    times["dense"].append(dense)
                    times["sparse"].append(sparse)
            medians = {label: statistics.median(values) for label, values in times.items()}
            rows.append({"batch": batch, **{f"{k}_ms": 1000 * v for k, v in medians.items()}})
            rows[-1]["speedup"] = medians["dense"] / medians["sparse"]
            print("batch", rows[-1], flush=True)
    finally:
        for layer in layers:
            layer.max_tokens = method_config("activation").max_tokens
    return rows


# --------------------------------------------------------------------------------------------- kernel alone


def kernel_backends(x: torch.Tensor, cut: torch.Tensor, gather) -> dict:
    """Each way to compute y = masked(x, cut) @ W^T for one token, as f(W, W^T): dense reads every column, the
    others only the kept ones (their index found anew per call, as decode would)."""

    def embedding_bag(weight, columns):
        index = (x[0].abs() > cut).nonzero().squeeze(1)
        return F.embedding_bag(index[None], columns, per_sample_weights=x[0, index][None], mode="sum")

    def index_select_mm(weight, columns):
        index = (x[0].abs() > cut).nonzero().squeeze(1)
        return x[:, index] @ columns.index_select(0, index)

    def compiled_gather(weight, columns):
        index = (x[0].abs() > cut).nonzero().squeeze(1)
        return gather(x[:, index], columns, index)

    return {
        "dense": lambda weight, columns: F.linear(x, weight),
        "cpp": lambda weight, columns: kernel.threshold_linear(x, columns, cut, None),
        "embedding_bag": embedding_bag,
        "index_select_mm": index_select_mm,
        "compiled_gather": compiled_gather,
    }


def kernel_table(args) -> list[dict]:
    """ms per y = W x (one token), each backend, cycling through enough copies of W to leave the caches."""
    kernel.backend()  # built before anything is timed
    gather = torch.compile(lambda values, columns, index: values @ columns.index_select(0, index), dynamic=True)
    rows = []
    for in_features, out_features, label in SHAPES:
        copies = max(2, int(args.kernel_bytes / (4 * in_features * out_features)))
        weights = [torch.randn(out_features, in_features) for _ in range(copies)]
        columns = [weight.t().contiguous() for weight in weights]
        for sparsity in args.kernel_sparsities:
            x = torch.randn(1, in_features)
            cut = torch.full((in_features,), float(x.abs().quantile(sparsity)) if sparsity else 0.0)
            kept = x.abs() > cut

            backends = kernel_backends(x, cut, gather)
            for name, backend in list(backends.items()):  # warm up (and compile)
                try:
                    backend(weights[0], columns[0])
                except Exception as error:  # torch.compile needs a working inductor toolchain
                    print(f"kernel: {name} unavailable ({type(error).__name__}: {error})", flush=True)
                    del backends[name]
            times: dict[str, list[float]] = {
                name: [] for name in ("dense", "cpp", "embedding_bag", "index_select_mm", "compiled_gather")
            }
            for _ in range(args.kernel_rounds):
                for name, backend in backends.items():
                    start = time.perf_counter()
                    for weight, column in zip(weights, columns):
                        backend(weight, column)
                    times[name].append((time.perf_counter() - start) / copies * 1000)
            row = {
                "shape": f"{in_features} -> {out_features}",
                "label": label,
                "sparsity": sparsity,
                "kept": float(kept.float().mean()),
                **{name: statistics.median(values) if values else None for name, values in times.items()},
            }
            rows.append(row)
            print("kernel", row, flush=True)
    return rows


# --------------------------------------------------------------------------------------------------- render


def dense_decode_range(result: dict) -> tuple[float, float]:
    """The slowest and fastest decode tokens/s of the dense model across the run's timed rows (levels, recoveries)."""
    timed = [row for level in result["levels"] for row in (level, level.get("recovered")) if row is not None]
    rates = [row["speed"]["dense"]["decode_tokens_per_s"] for row in timed]
    return min(rates), max(rates)


def speed_verdict(speedup: float, goal: float, spread: float) -> str:
    """'met' / 'not met', or 'not judged' when the dense timings of the run disagree beyond TIMING_SPREAD."""
    if spread > TIMING_SPREAD:
        return "not judged"
    return "met" if speedup >= goal else "not met"


def changes(row: dict, dense: dict) -> dict[str, float]:
    """Relative perplexity change against dense on the docs and on each extra text."""
    return {text: row[text]["value"] / dense[text]["value"] - 1 for text in ("docs", *EXTRA_TEXTS)}


def pct(value: float) -> str:
    return f"{100 * value:+.1f}%"


def seen_by(recovery_mix: list[str] | None) -> dict[str, bool]:
    """Which texts a row read, keyed as `changes` keys them ("docs" and each extra text): a level calibrates on the
    docs' train part only; a recovered row also trained on its recovery's mix texts (prune.data.seen, as for a
    recipe's data.mix)."""
    seen = seen_texts(EMBEDDED_DOCS, recovery_mix or [], [EMBEDDED_DOCS, *EXTRA_TEXTS], reads=True)
    return {"docs": seen.pop(EMBEDDED_DOCS), **seen}


def table_row(label: str, row: dict, dense: dict, kept: str, read: int, seen: dict[str, bool]) -> str:
    """One model's row of the main table: test figures (labelled seen / not seen) and changes, skipped weights,
    speed side by side (and the bound a step that only read weights would reach, from the `read` weights of a
    dense step)."""
    speed = row["speed"]
    change = changes(row, dense)
    return (
        f"| {label} | {interval(row['docs']['value'], row['docs']['ci95'])}{seen_label(seen['docs'])} | "
        f"{pct(change['docs'])} | "
        + "".join(
            f"{interval(row[text]['value'], row[text]['ci95'])}{seen_label(seen[text])} | {pct(change[text])} | "
            for text in EXTRA_TEXTS
        )
        + f"{100 * row['weights_skipped']:.1f}% | {100 * row['ffn_weights_skipped']:.1f}% | "
        f"{speed['sparse']['decode_tokens_per_s']:.2f} / {speed['dense']['decode_tokens_per_s']:.2f} | "
        f"{speed['decode_speedup']:.2f}x{' (slower)' if speed['decode_speedup'] < 1 else ''} | "
        f"{decode_bound(row, read):.2f}x | "
        f"{speed['prefill_speedup']:.2f}x{' (slower)' if speed['prefill_speedup'] < 1 else ''} | {kept} |"
    )


def render(result: dict) -> str:
    a, dense, read = result["args"], result["dense"], result["weights_read_per_token"]
    lines = [
        "## Activation sparsity (TEAL, CATS) of SmolLM2-135M on this CPU",
        "",
        f"Command: `{result['command']}`",
        "",
        (
            f"float32, {a['threads']} thread. Thresholds calibrated on {a['calibration']} windows of "
            f"{a['seq_len']} tokens of the docs' train part; per level the variant (score, allocation) with the lowest "
            f"perplexity on the docs' validation part ({result['validation_windows']} windows) is kept; perplexity "
            f"on the test parts of the docs (the first {result['test_windows']} windows) and of "
            + " and ".join(f"{text} (the first {result['extra_windows'][text]} windows)" for text in EXTRA_TEXTS)
            + ", [95% bootstrap interval], each labelled seen / not seen by that row (a level reads only the docs' "
            "train part; a recovered row also what its recovery trained on). Decode: "
            f"prompt 128, 32 tokens at batch 1; dense = the same model with its thresholds bypassed, alternated with "
            f"the sparse model {a['rounds']} times in this process (medians; ratio = sparse / dense tokens/s). "
            "Skipped: the share of the wrapped weights (FFN: of the FFN's weights) a test token does not read. "
            f"Weights-only bound: the decode speedup if a step cost only its weight reads ({read / 1e6:.1f} M weights "
            "per dense step, the skipped ones not read by the sparse step); attention, norms and per-call work are "
            "left out, so the measured speedup lies below it. Kernel: "
            f"{result['kernel']}."
            + (
                f" + recovery: the kept variant's thresholds fixed, its weights trained ({a['recover_mode']}, lr "
                f"{a['recover_lr']:g}, KL weight {a['recover_distill']:g} from the dense model) on the train parts of "
                f"{', '.join(['the docs', *(a.get('recover_mix') or [])])}, the step with the best perplexity on "
                f"{a['recover_eval_windows']} validation windows of the same texts kept "
                "(step 0, before training, competes); figures and speed measured as the level's."
                if a.get("recover_tokens")
                else ""
            )
        ),
        "",
        "| model | docs test | change | "
        + "".join(f"{text} test | change | " for text in EXTRA_TEXTS)
        + "weights skipped | FFN weights skipped | decode tok/s sparse / dense | decode speedup | weights-only bound "
        "| prefill speedup | kept variant |",
        "|---|---|---|" + "---|---|" * len(EXTRA_TEXTS) + "---|---|---|---|---|---|---|",
        f"| dense | {interval(dense['docs']['value'], dense['docs']['ci95'])} | | "
        + "".join(f"{interval(dense[text]['value'], dense[text]['ci95'])} | | " for text in EXTRA_TEXTS)
        + "| | | | | | |",
    ]
    for level in result["levels"]:
        chosen = ", ".join(f"{value}" for value in level["chosen"].values())
        named = f"{level['mode']} {level['sparsity']:g}"
        lines.append(table_row(named, level, dense, chosen, read, seen_by(None)))
        if "recovered" in level:
            again = level["recovered"]
            label = f"{named} + recovery ({again['mode']}, {again['tokens']:,} tokens)"
            kept = f"best step {again['best_step']} of {again['steps']}"
            lines.append(table_row(label, again, dense, kept, read, seen_by(a.get("recover_mix"))))
    zero = result["every_column"]
    lines += [
        "",
        f"Every column read through the kernel (teal, cut 0: no entry zeroed, the same logits as dense): decode "
        f"{zero['decode_speedup']:.2f}x, prefill {zero['prefill_speedup']:.2f}x dense: what the kernel and the W^T "
        "layout alone change, before any entry is zeroed.",
        "",
    ]
    if "every_neuron" in result:  # runs before the cats gate went through the kernel did not measure it
        ffn = result["every_neuron"]
        lines += [
            f"Every FFN neuron read through the kernel (cats, cut 0: gate, up and down read whole): decode "
            f"{ffn['decode_speedup']:.2f}x, prefill {ffn['prefill_speedup']:.2f}x dense: the part of a cats row's "
            "speedup that is the kernel's faster read, not its sparsity.",
            "",
        ]
    slowest, fastest = dense_decode_range(result)
    spread = fastest / slowest
    lines += [
        f"The dense model's decode across this run's rows: {slowest:.2f} to {fastest:.2f} tok/s (spread "
        f"{spread:.2f}x; speed goals are judged only up to {TIMING_SPREAD:.2f}x"
        + ("" if spread <= TIMING_SPREAD else ": beyond it here, the load on the shared CPU changed under the timings")
        + ").",
        "",
        "Goals (SmolLM2-135M, float32, 1 thread):",
        "",
    ]
    for (mode, sparsity), (quality, speedup) in GOALS.items():
        level = next((r for r in result["levels"] if (r["mode"], r["sparsity"]) == (mode, sparsity)), None)
        if level is None:
            continue
        rows = [(f"{mode} {sparsity:g}", level, seen_by(None))]
        if "recovered" in level:
            rows.append((f"{mode} {sparsity:g} + recovery", level["recovered"], seen_by(a.get("recover_mix"))))
        for label, row, seen in rows:
            change = changes(row, dense)
            met_quality = all(value <= quality for value in change.values())
            lines.append(
                f"- {label}: perplexity <= +{100 * quality:.0f}% on every text: "
                f"{'met' if met_quality else 'not met'} ("
                + ", ".join(f"{text} {pct(value)}{seen_label(seen[text])}" for text, value in change.items())
                + "); decode >= "
                f"{speedup}x: {speed_verdict(row['speed']['decode_speedup'], speedup, spread)} "
                f"({row['speed']['decode_speedup']:.2f}x; weights-only "
                f"bound {decode_bound(row, read):.2f}x)."
            )
    lines += [
        "",
        "Validation perplexity of every variant (what chose the kept one):",
        "",
        "| level | score | allocation | validation perplexity | calibration (s) |",
        "|---|---|---|---|---|",
        f"| dense | | | {dense['validation']:.3f} | |",
    ]
    for row in result["levels"]:
        for variant in row["variants"]:
            lines.append(
                f"| {row['mode']} {row['sparsity']:g} | {variant['score']} | {variant.get('allocation', 'uniform')} | "
                f"{variant['validation']:.3f} | {variant['calibration_s']:.0f} |"
            )
    sweep = next((row["batch_sweep"] for row in result["levels"] if "batch_sweep" in row), None)
    if sweep:
        lines += [
            "",
            "Batch sweep, teal 0.4 (whole-model decode of B sequences at once, the kernel serving every B; ms per "
            "decode step, medians of alternated runs):",
            "",
            "| B | dense ms | sparse ms | speedup |",
            "|---|---|---|---|",
        ]
        for row in sweep:
            slower = " (slower)" if row["speedup"] < 1 else ""
            lines.append(
                f"| {row['batch']} | {row['dense_ms']:.1f} | {row['sparse_ms']:.1f} | {row['speedup']:.2f}x{slower} |"
            )
    names = ["dense", "cpp", "embedding_bag", "index_select_mm", "compiled_gather"]
    lines += [
        "",
        "The kernel alone: ms per y = W x of one token, random inputs with the given share of zeros, cycling "
        f"through {a['kernel_bytes'] / 1e6:.0f} MB of weights (medians of {a['kernel_rounds']} alternated rounds):",
        "",
        "| shape (in -> out) | projections | zeros | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for row in result["kernel_table"]:
        best = min((name for name in names if row[name] is not None), key=lambda name: row[name])
        cells = [
            "n/a" if row[name] is None else f"**{row[name]:.3f}**" if name == best else f"{row[name]:.3f}"
            for name in names
        ]
        lines.append(f"| {row['shape']} | {row['label']} | {100 * row['sparsity']:.0f}% | " + " | ".join(cells) + " |")
    lines += ["", f"Took {result['seconds'] / 60:.0f} min.", ""]
    for note in result["args"].get("note") or []:
        lines += [note, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", nargs="+", default=["cats:0.5", "teal:0.4", "teal:0.5"])
    parser.add_argument("--calibration", type=int, default=4, help="train windows the thresholds calibrate on")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="windows per perplexity forward")
    parser.add_argument("--rounds", type=int, default=4, help="alternated dense/sparse timing rounds")
    parser.add_argument("--zeroed-windows", type=int, default=8, help="test windows the zeroed shares are read on")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--no-batch-sweep", dest="batch_sweep", action="store_false")
    parser.add_argument("--kernel-sparsities", nargs="+", type=float, default=[0.0, 0.4, 0.5, 0.7])
    parser.add_argument("--kernel-bytes", type=float, default=256e6)
    parser.add_argument("--kernel-rounds", type=int, default=7)
    parser.add_argument("--max-windows", type=int, default=40, help="cap on each held-out part (0: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recover-tokens", type=int, default=0, help="recovery per level, train tokens (0: none)")
    parser.add_argument("--recover-levels", nargs="+", help="the levels recovered (default: every level)")
    parser.add_argument(
        "--recover-mix", nargs="+", help="texts whose train parts join the docs' in recovery (data.mix, e.g. general)"
    )
    parser.add_argument("--recover-mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--recover-distill", type=float, default=1.0, help="KL weight from the dense model")
    parser.add_argument("--recover-lr", type=float, default=1e-4)
    parser.add_argument("--recover-batch", type=int, default=4, help="windows per recovery step")
    parser.add_argument("--recover-eval-windows", type=int, default=8, help="validation windows per recovery score")
    parser.add_argument("--note", action="append", help="a line added at the end of the section")
    parser.add_argument("--render", action="store_true", help="only rewrite the section from activation.json")
    args = parser.parse_args(argv)
    if args.render:
        print(f"wrote {write_section('activation', render(json.loads(JSON.read_text())))}")
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    splits = prepare(tokenizer, EMBEDDED_DOCS)
    extras = prepare_extra(tokenizer, list(EXTRA_TEXTS), args.seq_len)
    named = args.recover_mix or []
    mix = DataConfig(seq_len=args.seq_len, mix=GENERAL if named == [GENERAL] else named)
    args.recover_mix = mix.mix  # `general` stored as the texts it stands for
    recovery = interleave(splits, prepare_mix(tokenizer, mix), args.seq_len)  # the docs alone without a mix
    data = {
        "calibration": splits.calibration_blocks(args.calibration, args.seq_len, args.seed),
        "train": recovery.train_blocks(args.seq_len),  # what recovery trains on (--recover-tokens)
        "recover_validation": recovery.validation_blocks(args.seq_len),  # what chooses its best step
        "validation": splits.validation_blocks(args.seq_len)[: args.max_windows or None],
        "test": splits.test_blocks(args.seq_len)[: args.max_windows or None],
        **{text: extras[text].test_blocks(args.seq_len)[: args.max_windows or None] for text in EXTRA_TEXTS},
    }
    result = {
        "command": "python benchmarks/activation.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "kernel": kernel.backend(),
        "weights_read_per_token": weights_read_per_token(model),
        "validation_windows": len(data["validation"]),
        "test_windows": len(data["test"]),
        "extra_windows": {text: len(data[text]) for text in EXTRA_TEXTS},
        "dense": {
            "docs": figures(model, data["test"], args.batch),
            **{text: figures(model, data[text], args.batch) for text in EXTRA_TEXTS},
            "validation": perplexity(model, data["validation"], batch_size=args.batch).value,
        },
        "levels": [],
    }
    print("dense", result["dense"], flush=True)
    result["every_column"] = every_column(model, args, "teal")
    result["every_neuron"] = every_column(model, args, "cats")
    recovered_levels = {parse_level(level) for level in args.recover_levels or args.levels}
    for mode, sparsity in map(parse_level, args.levels):
        recovering = bool(args.recover_tokens) and (mode, sparsity) in recovered_levels
        result["levels"].append(run_level(model, mode, sparsity, data, args, recovering))
        JSON.write_text(json.dumps(result, indent=2))
    result["kernel_table"] = kernel_table(args)
    result["seconds"] = time.perf_counter() - start
    JSON.write_text(json.dumps(result, indent=2))
    print(f"wrote {write_section('activation', render(result))}")


if __name__ == "__main__":
    main()
