"""The GPU check: one command, meant to take under 8 minutes on one GPU (not yet measured: RESULTS.md has no
`gpu` section), that the runtime section works on real hardware.

    PYTHONPATH=. python benchmarks/gpu_check.py [--calibration-samples 128] [--cpu-threads N]

Every figure comes from `prune run` on the project's recipes (each in its own process, so a CPU and a CUDA
accelerate state never meet), with `runtime.device` / `runtime.dtype` set by `--set`:
- SparseGPT 2:4 of SmolLM2-135M (recipes/smollm2-135m/sparsegpt-2of4.yaml) on the GPU in bfloat16 and on the
  CPU in float32: held-out perplexity of each (the check: within 3%) and the pruning time per decoder block;
  the GPU run also times PyTorch's 2:4 semi-structured kernels against dense (eval/semi_structured.py).
- 200 steps of nm_gumbel mask training (recipes/smollm2-135m/2of4-maskllm.yaml) on the GPU: the trainer's
  tokens/s (median over its log windows after the first). Weights stay float32 (runtime.dtype) and the trainer
  autocasts to bfloat16 (train.mixed_precision: auto), MaskLLM's setting.
- With 2 GPUs or more: the same training for 50 steps as a 2-process DDP launch (recipes/accelerate/ddp.yaml).
- Activation sparsity's decode kernel as Triton (benchmarks/activation_gpu.py) against dense F.linear, batch 1.
It writes the `gpu` section of benchmarks/RESULTS.md. Exit status: 0 when measured and written; 0 too when this
machine has no CUDA GPU, after saying so and writing nothing (nothing here is a failure); 1 when the bfloat16
perplexity is not within 3% of float32 (the section is written all the same).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from benchmarks import activation_gpu
from benchmarks.results import write_section
from prune.runs.placed import local_model_dir

REPO = Path(__file__).resolve().parent.parent
SPARSEGPT = "recipes/smollm2-135m/sparsegpt-2of4.yaml"
MASKLLM = "recipes/smollm2-135m/2of4-maskllm.yaml"
DDP_CONFIG = "recipes/accelerate/ddp.yaml"
TOLERANCE = 0.03
NO_GPU = (
    "gpu_check: this machine has no CUDA GPU (torch.cuda.is_available() is False); nothing measured, "
    "benchmarks/RESULTS.md left as it was. Run it where `python -c 'import torch; print(torch.cuda.is_available())'` "
    "prints True."
)
# Evaluation the check does not need: lm-eval tasks, latency, FLOPs, a second (dense) perplexity, model/ on disk.
QUIET = [
    "eval.tasks=[]",
    "eval.latency=false",
    "eval.flops=false",
    "eval.dense_baseline=false",
    "export.save_model=false",
]


def prune_run(recipe: str, output: Path, sets: list[str], launcher: list[str] | None = None) -> dict:
    """`prune run RECIPE --set ...` in a child process; its report.json."""
    command = [
        *(launcher or [sys.executable]),
        "-m",
        "prune.cli",
        "run",
        recipe,
        "--output",
        str(output),
        *[arg for item in QUIET + sets for arg in ("--set", item)],
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, check=True, cwd=REPO, env=environment)
    return json.loads((output / "report.json").read_text())


def tokens_per_s(run_directory: Path) -> float:
    """Median of the trainer's logged tokens/s, the first window (compilation, warm-up) left out."""
    lines = (run_directory / "train" / "train_log.jsonl").read_text().splitlines()
    rates = [record["tokens_per_s"] for record in map(json.loads, lines) if "tokens_per_s" in record]
    return statistics.median(rates[1:] or rates)


def measure(work: Path, calibration_samples: int, cpu_threads: int, gpus: int) -> dict:
    blocks = AutoConfig.from_pretrained(local_model_dir("smollm2-135m")).num_hidden_layers
    data = f"data.calibration_samples={calibration_samples}"
    figures: dict = {
        "blocks": blocks,
        "calibration_samples": calibration_samples,
        "cpu_threads": cpu_threads,
        "gpu": torch.cuda.get_device_name(0),
        "gpus": gpus,
    }
    figures["sparsegpt_gpu"] = prune_run(
        SPARSEGPT,
        work / "sparsegpt-gpu",
        [data, "runtime.device=cuda", "runtime.dtype=bfloat16", "eval.semi_structured_kernel=true"],
    )
    figures["sparsegpt_cpu"] = prune_run(
        SPARSEGPT,
        work / "sparsegpt-cpu",
        [
            data,
            "runtime.device=cpu",
            "runtime.dtype=float32",
            f"runtime.threads={cpu_threads}",
            "eval.semi_structured_kernel=false",
        ],
    )
    train = ["runtime.device=cuda", "runtime.dtype=float32", "train.eval_every=0", "eval.semi_structured_kernel=false"]
    prune_run(MASKLLM, work / "nm-gumbel", [data, "train.steps=200", *train])
    figures["nm_gumbel_tokens_per_s"] = tokens_per_s(work / "nm-gumbel")
    if gpus >= 2:
        launcher = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            DDP_CONFIG,
            "--num_processes",
            "2",
        ]
        report = prune_run(MASKLLM, work / "ddp", [data, "train.steps=50", *train], launcher)
        figures["ddp"] = {
            "tokens_per_s": tokens_per_s(work / "ddp"),
            "seconds": report["train"]["seconds"],
            "perplexity": report["perplexity"]["value"],
        }
    figures["activation"] = activation_gpu.measure()
    return figures


def within_tolerance(figures: dict) -> bool:
    gpu, cpu = (figures[key]["perplexity"]["value"] for key in ("sparsegpt_gpu", "sparsegpt_cpu"))
    return abs(gpu - cpu) / cpu <= TOLERANCE


def section(figures: dict, command: str) -> str:
    """The `gpu` section of RESULTS.md."""
    gpu, cpu, blocks = figures["sparsegpt_gpu"], figures["sparsegpt_cpu"], figures["blocks"]
    ratio = gpu["perplexity"]["value"] / cpu["perplexity"]["value"] - 1
    lines = [
        "## GPU check (runtime.device / runtime.dtype on real hardware)",
        "",
        f"Command: `{command}` on {figures['gpus']} x {figures['gpu']}; SparseGPT 2:4 of SmolLM2-135M with "
        f"{figures['calibration_samples']} x 512 calibration tokens (CPU run: {figures['cpu_threads']} torch threads).",
        "",
        "| SparseGPT 2:4 | perplexity | prune seconds | seconds per block |",
        "|---|---|---|---|",
    ]
    for label, report in (("GPU, bfloat16", gpu), ("CPU, float32", cpu)):
        seconds = report["timings"]["prune"]
        lines.append(f"| {label} | {report['perplexity']['value']:.3f} | {seconds:.1f} | {seconds / blocks:.2f} |")
    verdict = "within" if within_tolerance(figures) else "NOT within"
    lines += ["", f"bfloat16 on the GPU vs float32 on the CPU: {ratio:+.2%} perplexity, {verdict} {TOLERANCE:.0%}.", ""]
    kernel = gpu.get("semi_structured_kernel")
    if kernel and kernel.get("available"):
        lines.append(
            f"2:4 semi-structured kernels (eval/semi_structured.py, {kernel['layers']} linears, "
            f"{kernel['dtype']}, batch {kernel['batch']} x {kernel['seq_len']} prefill): dense "
            f"{kernel['dense_ms']:.2f} ms, 2:4 {kernel['sparse_ms']:.2f} ms, speed-up {kernel['speedup']:.2f}x "
            f"(max abs logit difference {kernel['max_abs_logit_diff']:.3g})."
        )
    else:
        lines.append(f"2:4 semi-structured kernels: not measured ({(kernel or {}).get('reason', 'no 2:4 linears')}).")
    lines += [
        "",
        f"nm_gumbel mask training, 200 steps on the GPU (2of4-maskllm recipe, float32 weights, bf16 "
        f"autocast): {figures['nm_gumbel_tokens_per_s']:.0f} tokens/s.",
    ]
    ddp = figures.get("ddp")
    lines += [
        "",
        "2-process DDP mask training: not run (one GPU)."
        if ddp is None
        else f"2-process DDP mask training, 50 steps: {ddp['tokens_per_s']:.0f} tokens/s (both processes), "
        f"{ddp['seconds']:.1f} s, final perplexity {ddp['perplexity']:.3f}.",
    ]
    lines += activation_gpu.lines(figures["activation"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the CPU run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    command = (
        "PYTHONPATH=. python benchmarks/gpu_check.py "
        f"--calibration-samples {args.calibration_samples} --cpu-threads {args.cpu_threads}"
    )
    with tempfile.TemporaryDirectory() as work:
        figures = measure(Path(work), args.calibration_samples, args.cpu_threads, torch.cuda.device_count())
    body = section(figures, command)
    print(body)
    print(f"written to {write_section('gpu', body)}")
    return 0 if within_tolerance(figures) else 1


if __name__ == "__main__":
    sys.exit(main())
