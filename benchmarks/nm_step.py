"""Time and memory of one nm_gumbel mask-training step vs one dense full fine-tuning step, side by side.

    .venv/bin/python benchmarks/nm_step.py                      # SmolLM2-135M, batch 4 x 128, CPU
    .venv/bin/python benchmarks/nm_step.py --variants dense nm_gumbel naive --steps 5 --write

Every variant runs in a fresh child process (so peak RSS, `ru_maxrss`, belongs to that variant alone):
- dense:     AdamW over all weights; forward + backward + optimizer step.
- nm_gumbel: AdamW over the mask logits only (prior: magnitude, MaskLLM's schedule and regularizer);
             forward + regularizer + backward + step, through the fused `masked_linear` (defaults: on CPU
             the forward's Gumbel noise is kept for the backward as bfloat16).
- nm_gumbel_redraw: the same, with the noise redrawn from its seed in the backward (nothing kept).
- naive:     the same masks through plain autograd (WeightMasked: W * soft(), soft by ordinary ops, which
             keeps W ⊙ soft, the soft mask and the probabilities of every layer for the backward).
The time per step is the median over `--steps` steps after `--warmup` steps, as wall time and as the process's
CPU time (less sensitive to other processes sharing the cores). `--write` puts the table into
benchmarks/RESULTS.md with this command line (replacing this benchmark's previous section).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

START, END = "<!-- nm_step:start -->", "<!-- nm_step:end -->"
VARIANTS = ("dense", "nm_gumbel", "nm_gumbel_redraw", "naive")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(variant: str, args) -> dict:
    import torch

    from prune.masks.base import WeightMasked, mask_parameters, wrappers
    from prune.methods.nm_gumbel.method import NMGumbelConfig, attach_nm_gumbel
    from prune.runs.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load_model(args.model)
    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    rss_loaded = _rss_mb()
    objective = None
    if variant == "dense":
        model.train()
        model.requires_grad_(True)
        params = list(model.parameters())
    else:
        config = NMGumbelConfig(name="nm_gumbel", sparsity="2:4", prior="magnitude")
        objective = attach_nm_gumbel(model, config, None)
        if variant == "nm_gumbel_redraw":  # redraw the forward's Gumbel noise in the backward, keep nothing
            for wrapper in wrappers(model).values():
                wrapper.mask.store_noise = False
        if variant == "naive":  # the plain wrapper: effective weight W * mask(), soft() by autograd ops
            for name, wrapper in list(wrappers(model).items()):
                model.set_submodule(name, WeightMasked(wrapper.base, wrapper.mask))
        model.eval()
        model.requires_grad_(False)
        params = mask_parameters(model)
        for param in params:
            param.requires_grad_(True)
        for wrapper in wrappers(model).values():
            wrapper.mask.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    trained = sum(p.numel() for p in params)

    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        if objective is not None:
            objective.begin_step(step, args.warmup + args.steps)
        loss = model(input_ids=batch, labels=batch).loss
        if objective is not None:
            loss = loss + objective.regularizer(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {
        "variant": variant,
        "median_s": statistics.median(times),
        "times": times,
        "median_cpu_s": statistics.median(cpu_times),
        "peak_rss_mb": _rss_mb(),
        "rss_after_load_mb": rss_loaded,
        "trained_params": trained,
        "threads": torch.get_num_threads(),
        "loss": float(loss),
    }


def run_child(variant: str, argv: list[str]) -> dict:
    command = [sys.executable, __file__, "--child", variant, *argv]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict], reference: dict) -> str:
    lines = [
        (
            "| variant | trained params | step, wall (median) | vs dense | step, CPU time (median) | vs dense "
            "| peak RSS | vs dense |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['trained_params'] / 1e6:.1f} M | {r['median_s']:.2f} s | "
            f"{r['median_s'] / reference['median_s']:.2f}x | {r['median_cpu_s']:.2f} s | "
            f"{r['median_cpu_s'] / reference['median_cpu_s']:.2f}x | {r['peak_rss_mb'] / 1024:.2f} GB | "
            f"{r['peak_rss_mb'] / reference['peak_rss_mb']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--variants", nargs="+", default=["dense", "nm_gumbel"], choices=VARIANTS)
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    argv = [
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    variants = list(dict.fromkeys(["dense", *args.variants]))
    results = []
    for variant in variants:
        result = run_child(variant, argv)
        print(
            f"{variant}: median {result['median_s']:.2f} s/step (CPU {result['median_cpu_s']:.2f} s), "
            f"steps {[round(t, 2) for t in result['times']]}, "
            f"peak RSS {result['peak_rss_mb']:.0f} MB (after load {result['rss_after_load_mb']:.0f} MB)",
            flush=True,
        )
        results.append(result)
    text = table(results, results[0])
    print(text)
    if args.write:
        import torch

        command = "python benchmarks/nm_step.py " + " ".join(sys.argv[1:])
        section = (
            f"\n## nm_gumbel mask-training step vs dense fine-tuning step\n\n"
            f"`{command}` — {args.model}, batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after "
            f"{args.warmup} warm-up, each variant in a fresh process; "
            f"CPU: {platform.processor() or platform.machine()}, "
            f"{results[0]['threads']} torch threads, torch {torch.__version__}.\n\n{text}\n\n"
            "The goal for the mask step is at most 1.3x the time and 1.5x the peak memory of the dense step. "
            "Wall times move with whatever else runs on the machine; the CPU-time column counts this process "
            "only. dense trains every weight (embeddings included); the mask variants train the logits of the "
            "targeted linears (2:4: C(4,2) = 6 per group of 4 weights, 1.5 per weight), which is why their "
            "optimizer state is larger than dense's.\n"
        )
        path = Path(__file__).with_name("RESULTS.md")
        existing = path.read_text() if path.exists() else "# Benchmark results\n"
        block = f"{START}{section}{END}"
        if START in existing and END in existing:
            head, rest = existing.split(START, 1)
            existing = head + block + rest.split(END, 1)[1]
        else:
            existing = existing.rstrip("\n") + "\n" + block + "\n"
        path.write_text(existing)


if __name__ == "__main__":
    main()
