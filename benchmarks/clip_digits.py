"""R-AMT binary mask tuning of a random CLIP on scikit-learn's digits, offline: zero-shot (chance) vs tuned
held-out accuracy, with and without gradient dropout, and with 16 shots per class. Writes the `clip_digits`
section of benchmarks/RESULTS.md.

    python benchmarks/clip_digits.py                  # the shipped recipe and two variants: ~4 min on 1 core
    python benchmarks/clip_digits.py --steps 30       # a smoke run of the same variants

Every variant is `prune run recipes/clip/digits-offline.yaml` with the overrides listed in its row; the model
(clip-tiny-random) and the data split are seeded, so the figures are reproducible on one machine.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import write_section  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "clip" / "digits-offline.yaml"
VARIANTS = {
    "recipe": [],
    "no-gradient-dropout": ["method.gradient_dropout=0"],
    "16-shot": ["data.shots=16", "train.steps=300"],
}


def run_variant(name: str, overrides: list[str], steps: int | None, output: Path) -> dict:
    from prune.runs.pipeline import run
    from prune.runs.recipe import load_recipe

    overrides = list(overrides)
    if steps is not None:
        overrides = [item for item in overrides if not item.startswith("train.steps=")] + [f"train.steps={steps}"]
    recipe = load_recipe(RECIPE, overrides + [f"output={output / name}"])
    start = time.perf_counter()
    report = run(recipe, overwrite=True)
    return {
        "name": name,
        "overrides": overrides,
        "steps": recipe.train.steps,
        "train_images": report["eval_data"]["train_images"],
        "heldout_images": report["eval_data"]["heldout_images"],
        "zero_shot": report["dense"]["accuracy"]["digits"],
        "tuned": report["accuracy"]["digits"],
        "masked_targeted": report["masked"]["targeted"],
        "masked_all": report["masked"]["all"],
        "train_s": report["timings"].get("train", 0.0),
        "total_s": time.perf_counter() - start,
    }


def render(rows: list[dict], command: str, threads: int) -> str:
    lines = [
        "## R-AMT mask tuning of a random CLIP on digits (offline)",
        "",
        f"Command: `{command}`",
        "",
        "Model: clip-tiny-random (32x32 images, patch 8, 2 vision + 2 text layers, seeded random weights). Data: "
        "scikit-learn's 1797 digits upscaled to 32x32, 20% of each class held out (seeded). Masks on the image "
        'encoder\'s q/k/v/out projections and patch embedding; prompts "{}.". '
        "Zero-shot = the frozen random model (chance is 10%).",
        "",
        "| variant | overrides | steps | train images | held-out images | zero-shot acc | tuned acc | masked "
        "(targeted) | masked (all params) | train (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {' '.join(row['overrides']) or '-'} | {row['steps']} | {row['train_images']} | "
            f"{row['heldout_images']} | {row['zero_shot']:.1%} | {row['tuned']:.1%} | {row['masked_targeted']:.1%} | "
            f"{row['masked_all']:.1%} | {row['train_s']:.0f} |"
        )
    lines += [
        "",
        "Gradient dropout damps the score gradients that fight the zero-shot model's predictions; here that model "
        "is random (chance-level predictions), so the comparison only shows what the regularization costs when "
        "there is no zero-shot knowledge to keep. It is meant for a pretrained CLIP (recipes/clip/vit-b16-16shot.yaml, "
        "online). A step with gradient dropout costs about two plain steps (a second backward and a no-grad forward "
        "of the zero-shot model).",
        "",
        f"Timings on a 2-core CPU shared with other jobs (so they vary run to run), torch on {threads} thread(s).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="override train.steps of every variant (a smoke run)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest on a busy CPU)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/clip_digits.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory(prefix="clip-digits-") as output:
        for name in args.variants:
            rows.append(run_variant(name, VARIANTS[name], args.steps, Path(output)))
            print(f"{name}: zero-shot {rows[-1]['zero_shot']:.3f} -> tuned {rows[-1]['tuned']:.3f}", flush=True)
    section = render(rows, command.strip(), args.threads)
    if args.no_write:
        print(section)
    else:
        print(f"wrote {write_section('clip_digits', section)}")


if __name__ == "__main__":
    main()
