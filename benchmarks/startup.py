"""How long `prune` takes to refuse bad input: wall time from process start to exit 2, per refusal, beside what a
refusal waited for before the recipe was validated ahead of the heavy imports (`import prune.runs.pipeline`, which
pulls in torch, transformers and accelerate) and `import torch` alone.

Each command runs in a fresh interpreter `--repeats` times (after one warm-up run that fills the OS file cache);
the section reports the median and the fastest, the machine's load average before and after, and the modules
`python -X importtime` finds slowest on one refusal's import path. Run it on an idle machine: on a loaded one every
figure grows with the load (the issue's goal is under 2 s from start to exit 2 on an idle machine).

    python benchmarks/startup.py [--repeats 7]

Writes the `startup` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import write_section

ROOT = Path(__file__).resolve().parents[1]


def cases(scratch: Path) -> dict[str, tuple[list[str], int]]:
    """name -> (arguments of `python`, expected exit code)."""
    recipe = scratch / "wanda.yaml"
    recipe.write_text("method: {name: wanda, sparsity: 2:4}\n")
    unknown = scratch / "unknown.yaml"
    unknown.write_text("method: {name: nosuch}\n")
    a_file = scratch / "a-file"
    a_file.write_text("x")
    cli = ["-m", "prune.cli"]
    return {
        "unknown method": ([*cli, "run", str(unknown)], 2),
        "unknown --set key": ([*cli, "run", str(recipe), "--set", "data.bogus=1"], 2),
        "bad recipe value (sparsity 4:2)": ([*cli, "run", str(recipe), "--set", "method.sparsity=4:2"], 2),
        "missing model directory": ([*cli, "run", str(recipe), "--set", "model=/no/such/model"], 2),
        "output is a file": ([*cli, "run", str(recipe), "--output", str(a_file)], 2),
        "missing recipe file": ([*cli, "run", str(scratch / "none.yaml")], 2),
        "before: import prune.runs.pipeline": (["-c", "import prune.runs.pipeline"], 0),
        "import torch alone": (["-c", "import torch"], 0),
        "python -c pass": (["-c", "pass"], 0),
    }


def timed(arguments: list[str], expected: int, cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one fresh `python` from start to exit. On a busy machine the
    wall time grows with the load while the CPU time stays near what an idle machine's wall time would be."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *arguments], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != expected:
        raise SystemExit(f"{arguments}: exit {done.returncode}, expected {expected}\n{done.stderr[-2000:]}")
    return wall, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime


def slowest_imports(arguments: list[str], cwd: Path, count: int = 6) -> list[tuple[str, float]]:
    """The modules with the largest cumulative import time (`python -X importtime`) that no other listed one
    contains: the top-level imports of the refusal's path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *arguments], cwd=cwd, env=env, capture_output=True, text=True
    )
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.removeprefix("import time:").split("|")
            if not name.startswith("  "):  # a top-level import (its children are indented)
                rows.append((name.strip(), int(cumulative) / 1e6))
    return sorted(rows, key=lambda row: -row[1])[:count]


def render(
    times: dict[str, list[tuple[float, float]]], imports: list[tuple[str, float]], loads: tuple, command: str
) -> str:
    lines = [
        "## Start-up: how fast bad input is refused",
        "",
        f"`{command}`. A fresh `python` from start to exit, {len(next(iter(times.values())))} runs of each after one "
        f"warm-up: wall seconds and CPU seconds (user + system; on a busy machine the wall time grows with the load, "
        f"the CPU time stays near an idle machine's wall time). Load average {loads[0]:.2f} before, {loads[1]:.2f} "
        f"after, on {os.cpu_count()} CPUs. The refusals run `python -m prune.cli`, as the `prune` command does.",
        "",
        "| command | wall s, median | wall s, fastest | CPU s, median |",
        "|---|---:|---:|---:|",
    ]
    for name, runs in times.items():
        walls, cpus = [wall for wall, _ in runs], [cpu for _, cpu in runs]
        lines.append(f"| {name} | {statistics.median(walls):.2f} | {min(walls):.2f} | {statistics.median(cpus):.2f} |")
    lines += [
        "",
        "Slowest top-level imports of the `unknown method` refusal (`python -X importtime`, cumulative seconds):",
        "",
        "| module | s |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in imports]
    lines += [
        "",
        "A refusal now imports pydantic, PyYAML and the torch-free config modules only (tests/test_startup.py "
        "checks that no row of the bad-input table that needs no model imports torch, transformers, lm-eval & co.); "
        "`before` is what every refusal also paid until the recipe was validated ahead of the pipeline's imports.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per command (after one warm-up)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()
    command = "python benchmarks/startup.py " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="startup-") as scratch:
        scratch = Path(scratch)
        table = cases(scratch)
        times = {}
        for name, (arguments, expected) in table.items():
            timed(arguments, expected, scratch)  # warm-up: the OS file cache
            times[name] = [timed(arguments, expected, scratch) for _ in range(args.repeats)]
            print(f"{name}: median wall {statistics.median(wall for wall, _ in times[name]):.2f} s", flush=True)
        imports = slowest_imports(table["unknown method"][0], scratch)
    section = render(times, imports, (before, os.getloadavg()[0]), command.strip())
    if args.no_write:
        print(section)
    else:
        print(f"wrote {write_section('startup', section)}")


if __name__ == "__main__":
    main()
