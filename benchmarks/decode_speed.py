"""Decode speed of saved activation-sparsity runs, dense beside sparse in one process: the check to run on a
quiet machine when a longer benchmark's timings shared the CPU with other jobs.

Each run directory (e.g. a point of `prune sweep recipes/sweeps/smollm2-135m-speed.yaml`) is loaded with its
thresholds and timed by prune.methods.activation.speed.side_by_side (dense = the same model with its thresholds
bypassed, alternated `--rounds` times; medians); the load average is printed beside each, so a reader can see
whether anything else ran.

    python benchmarks/decode_speed.py runs/sweeps/smollm2-135m-speed/points/teal-40 ... --threads 1
"""

from __future__ import annotations

import argparse
import os

import torch

import prune
from prune.methods.activation.speed import side_by_side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories of the activation method")
    parser.add_argument("--rounds", type=int, default=7, help="alternated dense/sparse timing rounds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| run | decode tok/s sparse / dense | decode speedup | prefill speedup | load average |")
    print("|---|---|---|---|---|")
    for directory in args.runs:
        model = prune.load_model(directory)[0].eval()
        with torch.no_grad():
            speed = side_by_side(model, rounds=args.rounds)
        sparse, dense = speed["sparse"]["decode_tokens_per_s"], speed["dense"]["decode_tokens_per_s"]
        print(
            f"| {directory} | {sparse:.2f} / {dense:.2f} | {speed['decode_speedup']:.2f}x | "
            f"{speed['prefill_speedup']:.2f}x | {os.getloadavg()[0]:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
