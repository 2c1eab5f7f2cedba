"""VIB structured pruning of SmolLM2-135M vs one-shot structured baselines at the same size, with the exported
(physically smaller) model's latency beside the dense model's.

Protocol: masks train on the train part of the embedded CPython docs (and of the `--mix` texts; with
`--distill`, against the dense model's next-token distribution) and nothing picks among them (the last masks are
kept), so no choice reads the test part; every perplexity is measured on the first `--windows` windows of the
TEST part of the docs and of the texts every run measures (eval.extra_texts' default: moby-dick and the
never-seen sotu), each with its 95% bootstrap interval and labelled seen / not seen by that row's training or
calibration (prune.data.seen: the docs and the `--mix` texts are seen by VIB and the activation baseline).

For each target (share of parameters removed): VIB masks are trained mask-only (the one trainer), evaluated
with hard masks, exported, and the export is checked to reproduce the gated perplexity; then the structured
magnitude (L2) and activation (Wanda-style) baselines are allocated to *the share VIB actually removed* and
evaluated the same way. Latency: dense and exported models timed alternately in this one process (medians
of `--latency-rounds` interleaved rounds), prefill tokens/s and single-token decode ms. Writes
benchmarks/vib.json, benchmarks/vib_ppl_vs_params.png and the `vib` section of benchmarks/RESULTS.md.

    python benchmarks/vib.py --threads 1          # full settings: ~25 min per target on one CPU core
    python benchmarks/vib.py --steps 4 --windows 2 --latency-rounds 1   # a quick end-to-end check
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import interval, seen_label, write_section
from eval.bootstrap import perplexity_ci
from eval.flops import count_params
from eval.latency import measure_latency
from eval.perplexity import perplexity
from prune.data.config import EXTRA_TEXTS
from prune.data.seen import seen_texts
from prune.data.text import EMBEDDED_DOCS, DataConfig, interleave, prepare_extra, prepare_mix, prepare_source
from prune.methods.registry import get_method
from prune.methods.vib.method import BUDGET_TOLERANCE
from prune.runs.loading import load_model
from prune.structural.store import export_gated, gate_set, summary
from prune.sweep.compare import LEGEND
from prune.tasks.causal_lm import distillation_loss
from prune.training.config import TrainConfig
from prune.training.trainer import lm_loss, train

HERE = Path(__file__).parent
JSON = HERE / "vib.json"
PLOT = HERE / "vib_ppl_vs_params.png"
MODEL = "smollm2-135m"


def ppl(model, blocks) -> float:
    model.eval()
    return perplexity(model, blocks, desc="perplexity").value


def measured(model, texts: dict) -> dict:
    """The docs' test perplexity (`perplexity`) and each extra text's (under its name), each with its 95%
    interval."""
    model.eval()
    out = {}
    for key, blocks in texts.items():
        result = perplexity(model, blocks, desc=key)
        out[key] = result.value
        out[f"{key}_ci95"] = list(perplexity_ci(result.window_nll, result.window_tokens))
    return out


def with_ci(row: dict, key: str, mix: list[str] | None = None) -> str:
    """A perplexity and its interval; with `mix` (the run's data.mix), labelled seen / not seen by that row: VIB
    trains and the activation baseline calibrates on the docs and the mix; magnitude reads no text."""
    cell = interval(row[key], row[f"{key}_ci95"])
    if mix is None:
        return cell
    text = EMBEDDED_DOCS if key == "perplexity" else key
    return cell + seen_label(seen_texts(EMBEDDED_DOCS, mix, [text], reads=row["method"] != "magnitude")[text])


def latency_pair(dense, exported, args) -> dict:
    """Dense and exported timed alternately, `latency_rounds` rounds of 3 runs each; per model the best round
    (a shared CPU only ever slows a run down, so the fastest round is the least disturbed one)."""
    runs = {"dense": [], "exported": []}
    for _ in range(args.latency_rounds):
        for label, model in (("dense", dense), ("exported", exported)):
            result = measure_latency(model, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, repeats=3)
            runs[label].append((result.prefill_tokens_per_s, result.decode_ms_per_token))
    out = {}
    for label, values in runs.items():
        out[label] = {
            "prefill_tokens_per_s": max(v[0] for v in values),
            "decode_ms_per_token": min(v[1] for v in values),
            "rounds": values,
        }
    out["speedup_prefill"] = out["exported"]["prefill_tokens_per_s"] / out["dense"]["prefill_tokens_per_s"]
    out["speedup_decode"] = out["dense"]["decode_ms_per_token"] / out["exported"]["decode_ms_per_token"]
    return out


def run_vib(share: float, splits, texts: dict, teacher, args) -> tuple[dict, object]:
    """VIB masks at `share` removed, trained on `splits`' train part (against `teacher`, the dense model, with
    --distill)."""
    model, _ = load_model(MODEL)
    spec = get_method("vib")
    units = {kind: kind in args.units for kind in ("heads", "ffn", "hidden", "layers")}
    config = spec.config_class.model_validate(
        {
            "name": "vib",
            "target": {"params": share},
            "units": units,
            "kl_weight": args.kl_weight,
            "log_sigma2_lr_scale": args.sigma_lr_scale,
            "lagrangian_lr_scale": args.lagrangian_lr_scale,
            "target_warmup": args.target_warmup,
        }
    )
    objective = spec.attach(model, config, None)
    blocks = splits.train_blocks(args.seq_len)
    if args.fraction < 1.0:
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
        blocks = blocks[order[: max(1, round(args.fraction * len(blocks)))]]
    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        log_every=max(1, args.steps // 10),
        checkpoint_every=max(args.steps, 1),
        seed=0,
    )

    def task_loss(masked, batch):
        return distillation_loss(masked, teacher, batch, args.distill)

    with tempfile.TemporaryDirectory() as directory:
        result = train(
            model, objective, blocks, train_config, Path(directory), task_loss=task_loss if args.distill else lm_loss
        )
        log = [json.loads(line) for line in (Path(directory) / "train" / "train_log.jsonl").read_text().splitlines()]
    gated = measured(model, texts)
    figures = summary(gate_set(model), args.seq_len)
    exported = export_gated(model, config)
    row = {
        "method": "vib",
        "target": share,
        **gated,
        "exported_perplexity": ppl(exported, texts["perplexity"]),
        "params_kept": figures["params"]["kept"],
        "params_removed": figures["params"]["removed"],
        "flops_removed": figures["flops"]["removed"],
        "hidden": figures["hidden"],
        "layers": figures["layers"],
        "train_seconds": result.seconds,
        "seconds_per_step": result.seconds / max(1, args.steps),
        "log": [
            {
                key: line.get(key)
                for key in ("step", "task_loss", "hard_removed", "expected_removed", "lambda1", "lambda2", "target")
            }
            for line in log
        ],
    }
    assert count_params(exported).total == row["params_kept"]
    return row, exported


def run_baseline(score: str, share: float, target: float, texts: dict, calibration, dense_model, args) -> dict:
    """One structured baseline at `share` removed; the activation one at the target is also exported and timed."""
    model, _ = load_model(MODEL)
    spec = get_method("structured")
    config = spec.config_class.model_validate({"name": "structured", "score": score, "target": {"params": share}})
    spec.attach(model, config, calibration)
    figures = summary(gate_set(model), args.seq_len)
    row = {
        "method": f"structured-{score}",
        "target": target,
        **measured(model, texts),
        "params_kept": figures["params"]["kept"],
        "params_removed": figures["params"]["removed"],
        "flops_removed": figures["flops"]["removed"],
        "hidden": figures["hidden"],
    }
    if score == "activation" and abs(share - target) <= 0.02:  # the target size: its speedup is what that size buys
        exported = export_gated(model, config)
        row["exported_perplexity"] = ppl(exported, texts["perplexity"])
        row["latency"] = latency_pair(dense_model, exported, args)
    return row


def plot(results: dict) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results["dense"]
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({row["method"] for row in results["rows"]})
    for marker, method in zip("osD^", methods):
        rows = sorted((r for r in results["rows"] if r["method"] == method), key=lambda r: r["params_kept"])
        ax.plot(
            [r["params_kept"] / dense["params"] for r in rows],
            [r["perplexity"] for r in rows],
            marker=marker,
            label=method,
        )
    ax.scatter([1.0], [dense["perplexity"]], color="black", marker="*", s=120, zorder=5, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("parameters kept (share of dense)")
    ax.set_ylabel("test perplexity (log)")
    ax.set_title("SmolLM2-135M, structured pruning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    return PLOT


def goal_lines(rows: list[dict], dense: dict, unseen: list[str]) -> list[str]:
    """Per target: VIB against the best one-shot baseline cut to the same size, its perplexity on each text its
    training never read (`unseen`) over the dense model's (the goal at 30%: at most 1.5x), and the export's
    speedup."""
    lines = []
    for vib in (r for r in rows if r["method"] == "vib"):
        peers = [
            r
            for r in rows
            if r["method"] != "vib"
            and r["target"] == vib["target"]
            and abs(r["params_removed"] - vib["params_removed"]) < 0.005
        ]
        line = (
            f"Target {vib['target']:.2f}: VIB removed {vib['params_removed']:.3f} of the parameters "
            f"({'meets' if vib['params_removed'] >= vib['target'] - BUDGET_TOLERANCE else 'misses'} the budget)"
        )
        if peers:
            best = min(peers, key=lambda r: r["perplexity"])
            line += (
                f"; perplexity {vib['perplexity']:.2f} vs {best['perplexity']:.2f} for the best one-shot "
                f"baseline at that size ({best['method']}, {best['perplexity'] / vib['perplexity']:.1f}x higher)"
            )
        for name in unseen:
            ood = vib[name] / dense[name]
            line += f"; {name} (not seen) {vib[name]:.2f} = {ood:.2f}x dense" + (
                f" (goal <= 1.5x: {'met' if ood <= 1.5 else 'not met'})" if abs(vib["target"] - 0.3) < 1e-9 else ""
            )
        if "latency" in vib:
            line += (
                f"; exported model {vib['latency']['speedup_prefill']:.2f}x faster prefill, "
                f"{vib['latency']['speedup_decode']:.2f}x faster decode than dense"
            )
        lines += ["", line + "."]
    return lines


def render(results: dict) -> str:
    d, a = results["dense"], results["args"]
    texts, mix_texts = results["extra_texts"], a.get("mix") or []
    seen_by_vib = seen_texts(EMBEDDED_DOCS, mix_texts, texts, reads=True)
    mix = ", ".join(mix_texts)
    trained_on = f"parts of the docs and of {mix} (window by window; calibration too)" if mix else "part"
    lines = [
        "## Structured pruning with VIB masks (VTrans)",
        "",
        f"Command: `{results['command']}`",
        "",
        (
            f"SmolLM2-135M; perplexity on the first {a['windows']} windows of {a['seq_len']} tokens of the test part "
            f"of the embedded CPython docs ({results['test_tokens']} tokens) and of "
            + ", ".join(f"{name} ({results['tokens'][name]} tokens)" for name in texts)
            + f", [95% CI] from a bootstrap over those windows ({LEGEND}); masks trained on the "
            f"train {trained_on}, the last ones kept (no selection). VIB: mask-only training, {a['steps']} steps x "
            "batch "
            f"{a['batch']} x "
            f"{a['seq_len']} tokens, lr {a['lr']} (log sigma^2 x{a['sigma_lr_scale']:g}, multipliers "
            f"x{a['lagrangian_lr_scale']:g}), target warm-up {a['target_warmup']:g} of the steps, units "
            f"{', '.join(a['units'])}, KL weight {a['kl_weight']}. Baselines: one-shot, the same share of head units "
            f"and neurons in every layer, allocated to the share VIB removed (activation scores from "
            f"{a['calibration']} calibration blocks). Dense perplexity {with_ci(d, 'perplexity')}, "
            + ", ".join(f"{name} {with_ci(d, name)}" for name in texts)
            + f"; {d['params']:,} parameters."
        ),
        "",
        "| target | method | params kept | params removed | FLOPs removed | test perplexity [95% CI] | x dense | "
        + "".join(f"{name} [95% CI] | x dense | " for name in texts).rstrip(),
        "|---|---|---|---|---|---|---|" + "---|---|" * len(texts),
    ]
    order = sorted(results["rows"], key=lambda r: (r["target"], r["params_removed"], r["method"] != "vib", r["method"]))
    for row in order:
        lines.append(
            f"| {row['target']:.2f} | {row['method']} | {row['params_kept']:,} | {row['params_removed']:.3f} | "
            f"{row['flops_removed']:.3f} | {with_ci(row, 'perplexity', mix_texts)} | "
            f"{row['perplexity'] / d['perplexity']:.2f} | "
            + "".join(f"{with_ci(row, name, mix_texts)} | {row[name] / d[name]:.2f} | " for name in texts).rstrip()
        )
    lines += [
        "",
        (
            "Exported models (physically sliced) vs dense, timed alternately in this run "
            f"(prompt {a['prompt_len']} tokens, {a['decode_tokens']} decoded, batch 1, {a['threads']} threads; "
            f"best of {a['latency_rounds']} interleaved rounds of 3 runs):"
        ),
        "",
        (
            "| target, model | exported ppl (= gated) | hidden | prefill tok/s dense -> exported | speedup | "
            "decode ms/token dense -> exported | speedup |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if "latency" not in row:
            continue
        lat = row["latency"]
        lines.append(
            f"| {row['target']:.2f} {row['method']} ({row['params_removed']:.2f} removed) | "
            f"{row['exported_perplexity']:.2f} (= {row['perplexity']:.2f}) | {row['hidden']} | "
            f"{lat['dense']['prefill_tokens_per_s']:.0f} -> {lat['exported']['prefill_tokens_per_s']:.0f} | "
            f"{lat['speedup_prefill']:.2f}x | {lat['dense']['decode_ms_per_token']:.1f} -> "
            f"{lat['exported']['decode_ms_per_token']:.1f} | {lat['speedup_decode']:.2f}x |"
        )
    short = [r for r in results["rows"] if r["method"] == "vib" and r["params_removed"] < r["target"] - 0.02]
    for row in short:
        lines += [
            "",
            (
                f"VIB at target {row['target']:.2f} removed only {row['params_removed']:.3f} in {a['steps']} "
                "steps (too few to meet the budget); its baselines were cut both to that share and to the target."
            ),
        ]
    lines += goal_lines(results["rows"], d, [name for name in texts if not seen_by_vib[name]])
    per_step = statistics.mean(r["seconds_per_step"] for r in results["rows"] if r["method"] == "vib")
    lines += [
        "",
        f"![perplexity vs parameters kept]({PLOT.name})",
        "",
        (
            f"Training took {per_step:.1f} s per step here (2-core CPU shared with other jobs, so latencies are "
            "noisy too)."
        ),
        "",
    ]
    lines += results.get("notes", [])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5], help="shares of parameters removed")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--sigma-lr-scale", type=float, default=4.0, help="VIB log sigma^2 lr relative to --lr")
    parser.add_argument("--lagrangian-lr-scale", type=float, default=10.0, help="lambda lr relative to --lr")
    parser.add_argument("--target-warmup", type=float, default=0.5, help="share of steps warming the target up")
    parser.add_argument("--units", nargs="+", default=["heads", "ffn", "hidden"])
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the training blocks (VTrans Fast)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--mix",
        nargs="*",
        default=[],
        help="other texts whose train parts join training and calibration (data.mix), e.g. moby-dick",
    )
    parser.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="weight of the KL divergence from the dense model in the training loss (train.distill)",
    )
    parser.add_argument("--windows", type=int, default=16, help="test windows per text for perplexity")
    parser.add_argument("--calibration", type=int, default=32, help="calibration blocks for activation scores")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--latency-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", action="append", default=[], help="a line added under the tables")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/vib.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    start = time.perf_counter()
    dense_model, tokenizer = load_model(MODEL)
    data = DataConfig(seq_len=args.seq_len, mix=args.mix)
    splits = interleave(prepare_source(tokenizer, data), prepare_mix(tokenizer, data), args.seq_len)
    extra = prepare_extra(tokenizer, list(EXTRA_TEXTS), args.seq_len)
    texts = {
        "perplexity": splits.test_blocks(args.seq_len)[: args.windows],
        **{name: text.test_blocks(args.seq_len)[: args.windows] for name, text in extra.items()},
    }
    calibration = splits.calibration_blocks(args.calibration, args.seq_len, 0)
    results = {
        "command": command,
        "args": vars(args),
        "test_tokens": int(texts["perplexity"].numel()),
        "extra_texts": list(extra),
        "tokens": {name: int(texts[name].numel()) for name in extra},
        "rows": [],
        "dense": {**measured(dense_model, texts), "params": count_params(dense_model).total},
        "notes": args.note,
    }
    for share in args.targets:
        row, exported = run_vib(share, splits, texts, dense_model, args)
        row["latency"] = latency_pair(dense_model, exported, args)
        results["rows"].append(row)
        del exported
        shares = [row["params_removed"]] if row["params_removed"] >= 0.01 else []  # the size VIB reached ...
        if row["params_removed"] < share - 0.02:
            shares.append(share)  # ... and, when VIB fell short, the target too
        for same_size in shares:
            for score in ("magnitude", "activation"):
                results["rows"].append(run_baseline(score, same_size, share, texts, calibration, dense_model, args))
        JSON.write_text(json.dumps(results, indent=2))
    results["seconds"] = time.perf_counter() - start
    JSON.write_text(json.dumps(results, indent=2))
    plot(results)
    print(f"wrote {write_section('vib', render(results))}")


if __name__ == "__main__":
    main()
