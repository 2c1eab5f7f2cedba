"""Dynamic gating (Fire Together Wire Together): a small ResNet on scikit-learn's digits, and per-token FFN
gating of SmolLM2-135M on held-out embedded text. Writes the `gating` section of benchmarks/RESULTS.md,
benchmarks/gating.json (every part's figures; running one part keeps the others') and benchmarks/gating-llm.png
(`--dry-run`: prints the section and writes nothing).

    python benchmarks/gating.py --part cnn                 # resnet-digits, 2 modes x 4 thresholds: ~20 min, 1 core
    python benchmarks/gating.py --part llm                 # 4 thresholds x 60 steps: ~30-45 min, 1 thread
    python benchmarks/gating.py --part llm-joint --joint-thresholds 0.95 0.9 0.8 0.7   # ~20 min per r (and r = 1)
    python benchmarks/gating.py --part llm --dry-run --steps 2 --windows 2 --thresholds 0.9 --oracle-keep 0.5 \
        --flops-windows 1 --latency-rounds 1 --prompt-len 16 --decode-tokens 4 --kernel-keep 0.5 \
        --kernel-repeats 1                                 # a quick end-to-end check: ~2 min

The LLM parts train on the docs' train part only and measure perplexity, each with its 95% bootstrap interval, on
the first --windows windows of the test parts of the docs and of moby-dick and sotu (never read: not seen).

CNN: the recipe recipes/resnet-digits/gating-r80.yaml through `prune run`'s pipeline, for each mode
(decoupled: frozen backbone; joint: backbone fine-tuned with the gates) and threshold r: held-out accuracy
and conv FLOPs per image from its report (every conv of the net is in a gated block; predictors and their
pooling counted). The alias resnet-digits is trained in a fresh cache by the first run.
LLM: dense perplexity; the oracle gate (each token's largest |act(gate)*up| neurons, from the full
activations) at several keep fractions; then per r, predictors trained (decoupled, backbone frozen) and
measured: perplexity through the real sparse path, FFN FLOPs per token (gate, up and down of the kept neurons
plus the predictor) vs dense, recall of the oracle's choice at the same budget, and whole-model CPU latency
(decode ms/token and prefill tokens/s, gated vs dense, interleaved). A kernel sweep times the sparse FFN
path alone against the dense FFN at fixed keep fractions, for one token (decode) and a prefill block.
LLM joint: predictors and backbone trained together (run_llm_joint), against the dense model fine-tuned alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import interval, seen_label, write_section  # noqa: E402
from prune.data.config import EMBEDDED_DOCS, EXTRA_TEXTS  # noqa: E402
from prune.data.seen import seen_texts  # noqa: E402

HERE = Path(__file__).resolve().parent
JSON = HERE / "gating.json"
CNN_RECIPE = HERE.parent / "recipes" / "resnet-digits" / "gating-r80.yaml"
PLOT = HERE / "gating-llm.png"


# ------------------------------------------------------------------------------------------------------ CNN


def run_cnn(args) -> dict:
    """`prune run recipes/resnet-digits/gating-r80.yaml` once per mode and threshold (every other setting as the
    recipe has it), so each row is what the recipe writes. The cache is a fresh one: the alias resnet-digits
    is trained here, as on a user's first run."""
    from prune.runs.pipeline import run
    from prune.runs.recipe import load_recipe

    result: dict = {"recipe": str(CNN_RECIPE.relative_to(HERE.parent)), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MASKPRUNE_CACHE"] = str(Path(tmp) / "cache")
        for mode in args.cnn_modes:
            for threshold in args.cnn_thresholds:
                recipe = load_recipe(
                    CNN_RECIPE,
                    [f"method.mode={mode}", f"method.threshold={threshold}", f"output={tmp}/{mode}-{threshold}"],
                )
                report = run(recipe)
                gating, dense = report["gating"], report["dense"]
                assert gating["flops_per_input"]["dense"] == dense["flops"]["dense"], "a conv is outside the gates"
                if not result["rows"]:  # the first run trained the alias in its load stage
                    result.update(
                        train_images=report["eval_data"]["train_images"],
                        test_images=report["eval_data"]["heldout_images"],
                        alias_load_s=report["timings"]["load"],
                        dense_accuracy=dense["accuracy"]["digits"],
                        dense_conv_flops=dense["flops"]["dense"],
                    )
                result["rows"].append(
                    {
                        "mode": mode,
                        "threshold": threshold,
                        "accuracy": report["accuracy"]["digits"],
                        "conv_flops": gating["flops_per_input"],
                        "keep_fraction": gating["keep_fraction"],
                        "target_recall": gating["target_recall"],
                        "target_precision": gating["target_precision"],
                        "train_s": report["train"]["seconds"],
                    }
                )
                print(f"cnn {mode} r={threshold}: {result['rows'][-1]}", flush=True)
    return result


# ------------------------------------------------------------------------------------------------------ LLM


def _latency(model, args) -> dict:
    from eval.latency import measure_latency

    result = measure_latency(model, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, repeats=3)
    return {"decode_ms_per_token": result.decode_ms_per_token, "prefill_tokens_per_s": result.prefill_tokens_per_s}


def _paired_latency(model, args) -> dict:
    """Gated and dense (gates bypassed, same model object) measured alternately, medians of `rounds` each."""
    from prune.methods.gating.layers import bypassed

    gated, dense = [], []
    for _ in range(args.latency_rounds):
        with bypassed(model):
            dense.append(_latency(model, args))
        gated.append(_latency(model, args))
    median = lambda runs, key: statistics.median(run[key] for run in runs)  # noqa: E731
    return {
        f"{label}_{key}": median(runs, key)
        for label, runs in (("gated", gated), ("dense", dense))
        for key in ("decode_ms_per_token", "prefill_tokens_per_s")
    }


def kernel_sweep(model, args) -> list[dict]:
    """The sparse FFN path against the dense FFN at fixed keep fractions (random per-token masks), cycling
    through every layer as a forward does (so weights come from memory, not from a warm cache); ms per layer."""
    from prune.methods.gating.layers import gated_layers
    from prune.methods.gating.sparse_ffn import sparse_ffn

    layers = list(gated_layers(model).values())
    packs = [layer.packed() for layer in layers]
    hidden, inter = packs[0].hidden, packs[0].intermediate
    rows = []
    generator = torch.Generator().manual_seed(0)
    for tokens in (1, args.seq_len):
        x = torch.randn(tokens, hidden, generator=generator)
        for keep_fraction in args.kernel_keep:
            keep = torch.rand(tokens, inter, generator=generator) < keep_fraction
            runs = {
                "dense": lambda i, x=x: layers[i].base(x),
                "sparse": lambda i, x=x, keep=keep: sparse_ffn(x, keep, packs[i], max_union=1.0),
            }
            timings = {label: [] for label in runs}
            with torch.no_grad():
                for _ in range(args.kernel_repeats):
                    for label, run in runs.items():
                        start = time.perf_counter()
                        for i in range(len(layers)):
                            run(i)
                        timings[label].append((time.perf_counter() - start) / len(layers))
            dense_ms, sparse_ms = (1000 * statistics.median(timings[k]) for k in ("dense", "sparse"))
            rows.append(
                {
                    "tokens": tokens,
                    "keep": keep_fraction,
                    "union": float(keep.any(0).float().mean()),
                    "dense_ms": dense_ms,
                    "sparse_ms": sparse_ms,
                    "speedup": dense_ms / sparse_ms,
                }
            )
            print(f"kernel {rows[-1]}", flush=True)
    return rows


def heldout_texts(tokenizer, splits, args) -> dict[str, torch.Tensor]:
    """The windows every LLM perplexity is measured on: the first --windows of the docs' test part and of each
    extra text's (moby-dick, sotu: never read here, predictors and backbone train on the docs' train part only)."""
    from prune.data.text import prepare_extra

    extras = prepare_extra(tokenizer, list(EXTRA_TEXTS), args.seq_len)
    return {
        EMBEDDED_DOCS: splits.test_blocks(args.seq_len)[: args.windows],
        **{text: extras[text].test_blocks(args.seq_len)[: args.windows] for text in EXTRA_TEXTS},
    }


def measured(model, texts: dict[str, torch.Tensor], label: str) -> dict:
    """Perplexity with its 95% bootstrap interval on each text: the docs' as `perplexity` and `perplexity_ci95`,
    the extra texts' under `extra_texts`."""
    from eval.bootstrap import perplexity_ci
    from eval.perplexity import perplexity

    figures = {}
    for text, blocks in texts.items():
        result = perplexity(model, blocks, desc=f"{label}, {text}")
        figures[text] = {"value": result.value, "ci95": list(perplexity_ci(result.window_nll, result.window_tokens))}
    docs = figures.pop(EMBEDDED_DOCS)
    return {"perplexity": docs["value"], "perplexity_ci95": docs["ci95"], "extra_texts": figures}


def run_llm(args) -> dict:
    from eval.perplexity import perplexity
    from prune.data.text import prepare
    from prune.masks.base import unwrap
    from prune.methods.gating.layers import oracle
    from prune.methods.gating.method import GatingConfig, attach_gating, measure_gating
    from prune.runs.loading import load_model
    from prune.training.config import TrainConfig
    from prune.training.trainer import train

    model, tokenizer = load_model("smollm2-135m")
    splits = prepare(tokenizer, EMBEDDED_DOCS)
    texts = heldout_texts(tokenizer, splits, args)
    heldout = texts[EMBEDDED_DOCS]
    train_rows = splits.train_blocks(args.seq_len)
    result: dict = {
        "seq_len": args.seq_len,
        "windows": len(heldout),
        "extra_windows": {text: len(texts[text]) for text in EXTRA_TEXTS},
        "tokens": int(heldout.numel()),
        "train_blocks": len(train_rows),
        "train_part": list(splits.ranges["train"]),
        "rank": args.rank,
        "steps": args.steps,
        "batch_size": args.batch,
        "lr": args.lr,
    }
    result["dense"] = measured(model, texts, "dense")
    print(f"dense {result['dense']}", flush=True)

    attach_gating(model, GatingConfig(name="gating"))
    result["oracle"] = []
    for keep in args.oracle_keep:
        with oracle(model, keep):
            value = perplexity(model, heldout, desc=f"oracle {keep}").value
        result["oracle"].append({"keep": keep, "perplexity": value})
        print(f"oracle keep={keep}: {value:.3f}", flush=True)
    result["kernel"] = kernel_sweep(model, args)
    unwrap(model)

    result["rows"] = []
    for threshold in args.thresholds:
        config = GatingConfig(
            name="gating", threshold=threshold, softmax=False, predictor_rank=args.rank, init_bias=1.0
        )
        objective = attach_gating(model, config)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            train(
                model,
                objective,
                train_rows,
                TrainConfig(
                    steps=args.steps,
                    batch_size=args.batch,
                    lr=args.lr,
                    log_every=10,
                    checkpoint_every=10**6,
                    seed=args.seed,
                ),
                Path(tmp),
            )
        train_s = time.perf_counter() - start
        figures = measured(model, texts, f"gated r={threshold}")
        summary = measure_gating(model, heldout[: args.flops_windows])
        with oracle(model, summary["keep_fraction"]):  # the ceiling at this predictor's own budget
            oracle_ppl = perplexity(model, heldout, desc="oracle at the same budget").value
        row = {
            "threshold": threshold,
            **figures,
            "oracle_perplexity_same_keep": oracle_ppl,
            "ffn_flops_per_token": summary["flops_per_input"],
            "keep_fraction": summary["keep_fraction"],
            "target_keep_fraction": summary["target_keep_fraction"],
            "oracle_recall": summary["oracle_recall"],
            "target_recall": summary["target_recall"],
            "target_precision": summary["target_precision"],
            "train_s": train_s,
            **_paired_latency(model, args),
        }
        result["rows"].append(row)
        print(f"llm r={threshold}: {row}", flush=True)
        unwrap(model)
    return result


def run_llm_joint(args) -> dict:
    """Joint mode on the LLM: predictors and every backbone weight train together (FTWT's joint mode), at each
    r in --joint-thresholds and at r = 1 (every neuron with a non-zero activation is a target, so the gate keeps
    all: the dense model fine-tuned alike, the fair reference, since the backbone also learns the domain)."""
    from prune.data.text import prepare
    from prune.methods.gating.method import GatingConfig, attach_gating, measure_gating
    from prune.runs.loading import load_model
    from prune.training.config import TrainConfig
    from prune.training.trainer import train

    _, tokenizer = load_model("smollm2-135m")
    splits = prepare(tokenizer, EMBEDDED_DOCS)
    texts = heldout_texts(tokenizer, splits, args)
    heldout = texts[EMBEDDED_DOCS]
    train_rows = splits.train_blocks(args.joint_seq_len)
    result: dict = {
        "seq_len": args.seq_len,
        "windows": len(heldout),
        "extra_windows": {text: len(texts[text]) for text in EXTRA_TEXTS},
        "tokens": int(heldout.numel()),
        "train_seq_len": args.joint_seq_len,
        "train_part": list(splits.ranges["train"]),
        "rank": args.rank,
        "steps": args.joint_steps,
        "batch_size": args.joint_batch,
        "lr": args.lr,
        "backbone_lr": args.lr * args.joint_backbone_lr_scale,
        "rows": [],
    }
    for threshold in [1.0, *args.joint_thresholds]:
        model, _ = load_model("smollm2-135m")
        if threshold == 1.0:
            result["dense"] = measured(model, texts, "dense")
        config = GatingConfig(
            name="gating",
            threshold=threshold,
            mode="joint",
            softmax=False,
            predictor_rank=args.rank,
            init_bias=1.0,
            backbone_lr_scale=args.joint_backbone_lr_scale,
        )
        objective = attach_gating(model, config)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            train(
                model,
                objective,
                train_rows,
                TrainConfig(
                    steps=args.joint_steps,
                    batch_size=args.joint_batch,
                    lr=args.lr,
                    log_every=10,
                    checkpoint_every=10**6,
                    seed=args.seed,
                ),
                Path(tmp),
            )
        train_s = time.perf_counter() - start
        summary = measure_gating(model, heldout[: args.flops_windows])
        row = {
            "threshold": threshold,
            **measured(model, texts, f"joint r={threshold}"),
            "ffn_flops_per_token": summary["flops_per_input"],
            "keep_fraction": summary["keep_fraction"],
            "oracle_recall": summary["oracle_recall"],
            "train_s": train_s,
        }
        result["rows"].append(row)
        print(f"llm joint r={threshold}: {row}", flush=True)
    return result


# --------------------------------------------------------------------------------------------------- report


def plot_llm(llm: dict, joint: dict | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not llm.get("rows"):
        return None
    dense = _dense(llm)["perplexity"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.fill_between([40, 100], [0, 0], [5, 5], color="0.88", label="goal: >= 40% fewer FFN FLOPs, <= +5% perplexity")
    oracle = sorted(llm.get("oracle", []), key=lambda row: row["keep"], reverse=True)
    ax.plot(
        [100 * (1 - row["keep"]) for row in oracle],
        [100 * (row["perplexity"] / dense - 1) for row in oracle],
        "s--",
        color="0.45",
        label="oracle per-token top-|h| (no predictor cost)",
    )
    rows = llm["rows"]
    xs = [100 * row["ffn_flops_per_token"]["reduction"] for row in rows]
    ys = [100 * (row["perplexity"] / dense - 1) for row in rows]
    ax.plot(xs, ys, "o-", color="C0", label=f"decoupled: predictors only (rank {llm['rank']}, counted)")
    for row, x, y in zip(rows, xs, ys):
        ax.annotate(f"r={row['threshold']:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if joint:  # against the dense model fine-tuned alike (r = 1), since joint mode also tunes the backbone
        reference = next(row["perplexity"] for row in joint["rows"] if row["threshold"] == 1.0)
        gated = [row for row in joint["rows"] if row["threshold"] < 1.0]
        ax.plot(
            [100 * row["ffn_flops_per_token"]["reduction"] for row in gated],
            [100 * (row["perplexity"] / reference - 1) for row in gated],
            "D-",
            color="C1",
            label="joint mode (vs dense fine-tuned alike)",
        )
    ax.set_xlabel("FFN FLOPs reduction per token (%)")
    ax.set_ylabel("perplexity increase over dense (%)")
    ax.set_title(f"SmolLM2-135M FFN gating, held-out embedded docs ({llm['tokens']} tokens)")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlim(0, 100)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    return PLOT


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _dense(part: dict) -> dict:
    """A part's untouched dense model's figures, shaped as a row's; records made before the intervals and the extra
    texts were measured hold the docs' perplexity alone."""
    return part.get("dense") or {"perplexity": part["dense_perplexity"]}


def _texts(part: dict) -> list[str]:
    """The texts a part measured: the docs, then the extra texts where its record has them."""
    return [EMBEDDED_DOCS, *_dense(part).get("extra_texts", {})]


def _figure(row: dict, text: str) -> dict:
    """A row's perplexity on `text` and its interval (None in records made before intervals were measured)."""
    if text == EMBEDDED_DOCS:
        return {"value": row["perplexity"], "ci95": row.get("perplexity_ci95")}
    return row["extra_texts"][text]


def _cell(row: dict, text: str) -> str:
    figure = _figure(row, text)
    return interval(figure["value"], figure["ci95"]) if figure["ci95"] else f"{figure['value']:.3f}"


def _change(row: dict, reference: dict, text: str) -> str:
    return _pct(_figure(row, text)["value"] / _figure(reference, text)["value"] - 1)


def _seen(text: str) -> str:
    """' (seen)' / ' (not seen)': every LLM run here reads the docs' train part and nothing else."""
    return seen_label(seen_texts(EMBEDDED_DOCS, [], [text], reads=True)[text])


def _header(text: str) -> str:
    return f"{'docs' if text == EMBEDDED_DOCS else text} test{_seen(text)}"


def render(results: dict) -> str:
    lines = ["## Dynamic gating (Fire Together Wire Together)", ""]
    cnn = results.get("cnn")
    if cnn:
        lines += [
            f"### CNN: resnet-digits (a Hugging Face ResNet; scikit-learn digits, {cnn['train_images']} train / "
            f"{cnn['test_images']} held-out images)",
            "",
            f"Command: `{cnn['command']}`",
            "",
            f"Each row is `prune run {cnn['recipe']}` with method.mode and method.threshold set as listed. "
            f"Dense: held-out accuracy {_pct(cnn['dense_accuracy'])}, {cnn['dense_conv_flops']:,} conv FLOPs "
            f"per image (the alias trained and loaded in {cnn['alias_load_s']:.0f} s). Gated FLOPs count the "
            "kept output channels times the non-zero input channels of every conv, plus each predictor "
            "(linear map and spatial mean).",
            "",
            "| mode | r | held-out accuracy | change (points) | conv FLOPs / image | reduction | channels kept | "
            "target recall / precision | train (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in cnn["rows"]:
            change = 100 * (row["accuracy"] - cnn["dense_accuracy"])
            lines.append(
                f"| {row['mode']} | {row['threshold']:g} | {_pct(row['accuracy'])} | {change:+.1f} | "
                f"{row['conv_flops']['gated']:,.0f} | {_pct(row['conv_flops']['reduction'])} | "
                f"{_pct(row['keep_fraction'])} | {row['target_recall']:.2f} / {row['target_precision']:.2f} | "
                f"{row['train_s']:.0f} |"
            )
        met = [
            row
            for row in cnn["rows"]
            if row["conv_flops"]["reduction"] >= 0.5 and row["accuracy"] >= cnn["dense_accuracy"] - 0.01
        ]
        lines += [
            "",
            "Goal (>= 50% fewer conv FLOPs for <= 1 point of accuracy): "
            + ("met by " + ", ".join(f"{row['mode']} r={row['threshold']:g}" for row in met) if met else "not met")
            + f" (1 point = {cnn['test_images'] / 100:.1f} held-out images).",
            "",
        ]
    llm = results.get("llm")
    if llm:
        texts, reference = _texts(llm), _dense(llm)
        dense = reference["perplexity"]
        lines += [
            f"### SmolLM2-135M: per-token FFN gating ({llm['windows']} held-out windows of {llm['seq_len']} tokens)",
            "",
            f"Command: `{llm['command']}`",
            "",
            f"Predictors: rank {llm['rank']}, trained {llm['steps']} steps x {llm['batch_size']} windows, decoupled "
            "(the model frozen). FFN FLOPs per token count gate, up and down of the kept neurons plus the predictor; "
            "the dense FFN is 3 x 2 x 576 x 1536 x 30 layers. " + texts_line(llm) + " The oracle figures are on the "
            "docs' test windows only.",
            "",
            "| r | "
            + "".join(f"{_header(text)} | change | " for text in texts)
            + "FFN FLOPs reduction | neurons kept | oracle recall | oracle ppl at same keep | decode ms/tok gated / "
            "dense | prefill tok/s gated / dense |",
            "|---|" + "---|---|" * len(texts) + "---|" * 6,
            "| dense | " + "".join(f"{_cell(reference, text)} | | " for text in texts) + "| | | | | |",
        ]
        for row in llm["rows"]:
            lines.append(
                f"| {row['threshold']:g} | "
                + "".join(f"{_cell(row, text)} | {_change(row, reference, text)} | " for text in texts)
                + f"{_pct(row['ffn_flops_per_token']['reduction'])} | {_pct(row['keep_fraction'])} | "
                f"{row['oracle_recall']:.3f} | {row['oracle_perplexity_same_keep']:.3f} | "
                f"{row['gated_decode_ms_per_token']:.1f} / {row['dense_decode_ms_per_token']:.1f} | "
                f"{row['gated_prefill_tokens_per_s']:.0f} / {row['dense_prefill_tokens_per_s']:.0f} |"
            )
        lines += [
            "",
            "Oracle (each token's largest |act(gate)*up| neurons from the full activations, no predictor "
            "cost; docs test windows): "
            + ", ".join(
                f"keep {_pct(row['keep'])} -> {_pct(row['perplexity'] / dense - 1)}" for row in llm.get("oracle", [])
            )
            + ".",
            "",
        ]
        met = [
            row
            for row in llm["rows"]
            if row["ffn_flops_per_token"]["reduction"] >= 0.4
            and row["perplexity"] <= 1.05 * dense
            and row["gated_decode_ms_per_token"] < row["dense_decode_ms_per_token"]
        ]
        lines += [
            "Goal (>= 40% fewer FFN FLOPs, <= +5% perplexity, faster on this CPU): "
            + ("met by " + ", ".join(f"r={row['threshold']:g}" for row in met) if met else "not met")
            + ".",
            "",
            "Sparse FFN path alone (ms per layer, cycling through all 30 layers; random per-token masks; union = "
            "share of neurons any token selected; the gather path forced even when the union is the whole layer):",
            "",
            "| tokens | keep | union | dense ms | sparse ms | speedup |",
            "|---|---|---|---|---|---|",
        ]
        for row in llm.get("kernel", []):
            verdict = "" if row["speedup"] >= 1 else " (slower than dense)"
            lines.append(
                f"| {row['tokens']} | {_pct(row['keep'])} | {_pct(row['union'])} | {row['dense_ms']:.3f} | "
                f"{row['sparse_ms']:.3f} | {row['speedup']:.2f}x{verdict} |"
            )
        lines += ["", f"![FFN FLOPs vs perplexity]({PLOT.name})", ""]
    joint = results.get("llm_joint")
    if joint:
        lines += render_llm_joint(joint)
    threads = (results.get("llm") or results.get("cnn") or {}).get("threads", 1)
    lines.append(
        f"Timings were taken on a 2-core CPU shared with other jobs, with {threads} torch thread(s): with a "
        "second thread, OpenMP kernels wait for a core another job holds (a gather that takes 0.5 ms took "
        "30 ms), so dense and gated are timed alike on one. Latencies are medians of interleaved gated/dense runs."
    )
    return "\n".join(lines)


def texts_line(result: dict) -> str:
    """Which texts a part read and which it measured: runs made before the docs were cut into train / validation /
    test trained on the first 90% of the stream, in an order drawn over that many windows, and measured the docs
    alone."""
    if "train_part" in result:
        start, end = result["train_part"]
        extra = result.get("extra_windows", {})
        return (
            f"Training windows from the docs' train part (tokens [{start}, {end})), the only text this run reads. "
            "Perplexity [95% bootstrap interval] on the first windows of each text's test part: "
            + ", ".join(
                f"{'docs' if text == EMBEDDED_DOCS else text}{_seen(text)} {windows}"
                for text, windows in {EMBEDDED_DOCS: result["windows"], **extra}.items()
            )
            + "."
        )
    return (
        "Measured before the docs were cut into train / validation / test: the held-out windows are the same test "
        "part, but the predictors trained on the first 90% of the stream (now the train part ends at 85%, so a "
        "rerun trains on fewer windows in another order); not re-measured since."
    )


def render_llm_joint(joint: dict) -> list[str]:
    reference = next(row for row in joint["rows"] if row["threshold"] == 1.0)
    texts, dense = _texts(joint), _dense(joint)
    lines = [
        "### SmolLM2-135M: joint mode (predictors and backbone trained together)",
        "",
        f"Command: `{joint['command']}`",
        "",
        (
            f"{joint['steps']} steps x {joint['batch_size']} windows of {joint['train_seq_len']} training tokens; "
            f"predictors lr {joint['lr']}, backbone lr {joint['backbone_lr']:g} (AdamW). The backbone also learns "
            "the domain, so the fair reference is r = 1 (every neuron kept: the dense model fine-tuned alike). "
            f"Held-out windows of {joint['seq_len']} tokens. " + texts_line(joint)
        ),
        "",
        "| r | "
        + "".join(f"{_header(text)} | vs dense fine-tuned alike | vs dense | " for text in texts)
        + "FFN FLOPs reduction | neurons kept | oracle recall | train (s) |",
        "|---|" + "---|---|---|" * len(texts) + "---|" * 4,
        "| dense, untouched | " + "".join(f"{_cell(dense, text)} | | | " for text in texts) + "| | | |",
    ]
    for row in joint["rows"]:
        lines.append(
            f"| {row['threshold']:g} | "
            + "".join(
                f"{_cell(row, text)} | {_change(row, reference, text)} | {_change(row, dense, text)} | "
                for text in texts
            )
            + f"{_pct(row['ffn_flops_per_token']['reduction'])} | "
            f"{_pct(row['keep_fraction'])} | {row['oracle_recall']:.3f} | {row['train_s']:.0f} |"
        )
    met = [
        row
        for row in joint["rows"]
        if row["ffn_flops_per_token"]["reduction"] >= 0.4 and row["perplexity"] <= 1.05 * reference["perplexity"]
    ]
    return lines + [
        "",
        "Goal's quality part (>= 40% fewer FFN FLOPs, <= +5% perplexity over the dense model fine-tuned "
        "alike): " + ("met by " + ", ".join(f"r={row['threshold']:g}" for row in met) if met else "not met") + ".",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cnn", "llm", "llm-joint", "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cnn-modes", nargs="+", default=["decoupled", "joint"])
    parser.add_argument("--cnn-thresholds", nargs="+", type=float, default=[0.95, 0.9, 0.8, 0.7])
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.95, 0.9, 0.8, 0.7])
    parser.add_argument("--oracle-keep", nargs="+", type=float, default=[0.7, 0.6, 0.5, 0.4])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--flops-windows", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--joint-thresholds", nargs="+", type=float, default=[0.9])
    parser.add_argument("--joint-steps", type=int, default=120)
    parser.add_argument("--joint-batch", type=int, default=2)
    parser.add_argument("--joint-seq-len", type=int, default=256)
    parser.add_argument("--joint-backbone-lr-scale", type=float, default=0.0025, help="backbone lr = --lr x this")
    parser.add_argument("--kernel-keep", nargs="+", type=float, default=[0.9, 0.7, 0.5, 0.3])
    parser.add_argument("--kernel-repeats", type=int, default=5)
    parser.add_argument(
        "--dry-run", action="store_true", help="print the section; write neither RESULTS.md, gating.json nor the plot"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/gating.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    results = json.loads(JSON.read_text()) if JSON.exists() else {}

    def keep(key: str, result: dict) -> None:
        results[key] = {**result, "command": command, "threads": args.threads}
        if not args.dry_run:
            JSON.write_text(json.dumps(results, indent=2))

    if args.part in ("cnn", "all"):
        keep("cnn", run_cnn(args))
    if args.part in ("llm", "all"):
        keep("llm", run_llm(args))
    if args.part == "llm-joint":
        keep("llm_joint", run_llm_joint(args))
    if args.dry_run:
        print(render(results))
        return
    if args.part in ("llm", "llm-joint", "all") and "llm" in results:
        plot_llm(results["llm"], results.get("llm_joint"))
    print(f"wrote {write_section('gating', render(results))}")


if __name__ == "__main__":
    main()
