"""One picture of the choices (issue 23 part 3): the shipped speed sweep in benchmarks/RESULTS.md.

Runs `prune sweep recipes/sweeps/smollm2-135m-speed.yaml` (a point already finished in its output directory is
resumed, not recomputed; the timings in its speed.json are reused while no point changed), then writes the `speed`
section from the sweep's sweep.md and copies its perplexity_vs_speed.png to benchmarks/speed-frontier.png, the
README's first figure.

    python benchmarks/speed_sweep.py        # a few hours on one core; once the sweep is done, seconds
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import write_section  # noqa: E402
from prune.sweep.recipe import load_sweep  # noqa: E402
from prune.sweep.runner import run_sweep  # noqa: E402

HERE = Path(__file__).parent
RECIPE = HERE.parent / "recipes" / "sweeps" / "smollm2-135m-speed.yaml"
FIGURE = HERE / "speed-frontier.png"


def render(command: str, sweep_md: str, notes: list[str]) -> str:
    """The section: the command, how it was measured, then sweep.md's tables under their own headings."""
    kept = [
        line
        for line in sweep_md.splitlines()[1:]  # sweep.md's own title replaced by the section's
        if not line.startswith(("- This invocation", "!["))  # a resumed invocation's time; the plots (one above)
    ]
    body = "\n".join(kept).strip()
    return "\n".join(
        [
            "## Speed against quality: every way to shrink SmolLM2-135M (`prune sweep`, speed axis)",
            "",
            f"Command: `{command}` (runs `prune sweep {RECIPE.relative_to(HERE.parent)}`, then renders its "
            "sweep.md here). Each point is a `prune run` of the recipe's base with that method; "
            "calibration reads the docs' train part only, so moby-dick and sotu are not seen by any point "
            "(each cell says so). Speed: the dense model and every point's saved model loaded into one process "
            "and timed in turn at batch 1 on 1 thread (docs/speed.md), on this shared 2-core CPU.",
            "",
            f"![Test perplexity against decode ms/token for every point, one panel per text]({FIGURE.name})",
            "",
            body,
            "",
            *(line for note in notes for line in (note, "")),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for pruning and evaluation")
    parser.add_argument("--note", action="append", default=[], help="a line added under the table")
    args = parser.parse_args(argv)
    command = "python benchmarks/speed_sweep.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    sweep, base = load_sweep(RECIPE)
    run_sweep(sweep, base)
    output = Path(sweep.output)
    shutil.copyfile(output / "perplexity_vs_speed.png", FIGURE)
    print(f"wrote {write_section('speed', render(command, (output / 'sweep.md').read_text(), args.note))}")


if __name__ == "__main__":
    main()
