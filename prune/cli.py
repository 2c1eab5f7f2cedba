"""`prune run | eval | export | sweep | compare | models`: thin argument parsing over the pipeline.

Bad input exits 2. What can be checked without torch (the recipe, its `--set` keys, the paths it names, a sweep
file, `prune eval`'s options) is checked before the modules that import torch, transformers or lm-eval are: a
refusal comes at once, not after the seconds those imports take."""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import shutil
import sys
import textwrap
import time
from pathlib import Path

from eval.metric_errors import NonFiniteError
from prune.data.config import EXTRA_TEXTS

# what a full, read-only or forbidden output looks like: bad input (exit 2), not a crash
DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


# how long processes other than 0 of a launch wait before repeating its refusal (exiting takes seconds when loaded)
LAUNCH_GRACE_S = 30


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what to do next (e.g. the exact command that resumes the run)."""


def _run(args: argparse.Namespace) -> None:
    from prune.runs.paths import check_paths
    from prune.runs.recipe import load_recipe

    overrides = list(args.set) + ([f"output={args.output}"] if args.output else [])
    recipe = load_recipe(args.recipe, overrides)
    check_paths(recipe)
    from prune.runs.pipeline import run  # torch, transformers: imported once the recipe and its paths are good
    from prune.runs.report import render

    try:
        report = run(recipe, overwrite=args.overwrite, resume=args.resume)
    except KeyboardInterrupt:
        raise Interrupted(_resume_hint(args, recipe.output)) from None
    except OSError as error:
        if error.errno in DISK_ERRORS:  # what to run once the disk has room again
            error.add_note(_resume_hint(args, recipe.output))
        raise
    if report is not None:  # None on the non-main processes of `accelerate launch`
        print(render(report))
        print(f"\nrun directory: {recipe.output}")


def _resume_hint(args: argparse.Namespace, output: str) -> str:
    """The exact command that continues an interrupted run, when it left a checkpoint to continue from."""
    from prune.runs.run_dir import last_checkpoint

    step = last_checkpoint(output)
    if step is None:
        return f"no training checkpoint was written in {output}; run the same command again to start over."
    sets = [part for value in args.set for part in ("--set", value)]
    command = ["prune", "run", args.recipe, *sets, "--output", output, "--resume"]
    return f"the last checkpoint ({step}) is in {output}. Resume with:\n  {shlex.join(command)}"


def _eval(args: argparse.Namespace) -> None:
    from prune.core.errors import UserInputError
    from prune.data.config import DataConfig
    from prune.data.sources import check_local_source, entry_error
    from prune.models.local import check_model_path
    from prune.models.runtime_config import RuntimeConfig
    from prune.runs.paths import check_eval_output, eval_output
    from prune.runs.recipe import parse_options
    from prune.tasks.eval_config import EvalConfig

    seq_len = args.seq_len if args.seq_len is not None else _run_seq_len(Path(args.model))
    data = parse_options(DataConfig, {"source": args.data, "seq_len": seq_len})
    config = parse_options(
        EvalConfig,
        {
            "tasks": args.tasks,
            "extra_texts": args.extra_texts,
            "limit": args.limit,
            "latency": not args.no_latency,
            "perplexity": not args.no_perplexity,
        },
    )
    runtime = parse_options(RuntimeConfig, {"device": args.device, "dtype": args.dtype})
    output = eval_output(args.model, args.output)
    check_eval_output(output)
    check_model_path(args.model)
    check_local_source(data.source)
    for source in config.extra_texts if config.perplexity else []:
        try:
            check_local_source(source)
        except UserInputError as error:
            raise entry_error("--extra-texts", source, error) from None
    from prune.runs.evaluate import evaluate, table  # torch, transformers, lm-eval: once the options are good

    report = evaluate(args.model, data, config, runtime, output)
    print(table(report))
    print(f"\nwritten to {output}: eval.json, eval.md")


def _run_seq_len(given: Path) -> int:
    """`prune eval`'s default window: a run directory's own data.seq_len (what it was pruned and measured with,
    within its model's positions), else DataConfig's default."""
    from prune.data.text import DataConfig
    from prune.runs import run_dir

    default = DataConfig.model_fields["seq_len"].default
    if not (given / run_dir.RECIPE_FILE).is_file():
        return default
    data = run_dir.read_recipe(given).get("data")
    seq_len = data.get("seq_len") if isinstance(data, dict) else None
    return seq_len if type(seq_len) is int else default


def _export(args: argparse.Namespace) -> None:
    from prune.runs.export import export_run

    print(f"exported: {export_run(args.run_dir)}")


def _sweep(args: argparse.Namespace) -> None:
    from prune.sweep.recipe import load_sweep

    overrides = list(args.set) + ([f"output={args.output}"] if args.output else [])
    sweep, base = load_sweep(args.recipe, overrides)
    from prune.sweep.runner import run_sensitivity, run_sweep  # torch: imported once the sweep file is good

    if args.sensitivity:
        run_sensitivity(sweep, base, force=args.force)
        print(f"\nsensitivity: {sweep.output}/sensitivity/")
        return
    from prune.sweep.compare import render

    result = run_sweep(sweep, base, force=args.force)
    print("\n" + render(result["rows"]))
    print(f"sweep directory: {sweep.output} ({', '.join(path.name for path in result['written'].values())})")


def _compare(args: argparse.Namespace) -> None:
    from prune.sweep.compare import compare, render

    rows, written = compare(args.run_dirs, args.output, overwrite=args.overwrite)
    print(render(rows))
    print(f"written to {args.output}: {', '.join(path.name for path in written.values())}")


def _models(args: argparse.Namespace) -> None:
    from prune.models.loading import list_models

    for entry in list_models():
        cached = entry["path"] or "not cached (fetched on first use)"
        print(f"{entry['name']:<16} {entry['description']}\n{'':<16} {cached}")


def _refuse_once(message: str) -> None:
    """Print a refusal once per launch: every process of an `accelerate launch` refuses alike, so process 0 says it
    and the launcher ends the others when it exits; another process speaks only after a grace period, when the
    refusal was its own and process 0 is still running."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        time.sleep(LAUNCH_GRACE_S)
    print(textwrap.fill(message, width=100, break_on_hyphens=False, break_long_words=False), file=sys.stderr)


def _disk_message(error: OSError) -> str:
    """One paragraph for a write the disk refused: the file, why, the free space there and what to do next."""
    where = Path(error.filename) if error.filename else None
    existing = next((path for path in (where, *where.parents) if path.exists()), None) if where else None
    free = f"; {shutil.disk_usage(existing).free / 1024**2:,.0f} MB free on that disk" if existing else ""
    then = " ".join(getattr(error, "__notes__", [])) or "then run the command again."
    return (
        f"error: cannot write {where or 'the output'}: {DISK_ERRORS[error.errno]} ({error.strerror}{free}). Free "
        "space or fix the permissions there (or choose another --output on a writable disk). Every file written so "
        f"far is whole (written atomically) and nothing was deleted; {then}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prune", description="Prune Hugging Face models with learnable masks.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="prune a model as a recipe says and evaluate it")
    run.add_argument("recipe", help="YAML recipe, e.g. recipes/default.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    run.add_argument("--output", help="run directory (default: the recipe's `output`)")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a MaskPrune run in the output directory (only its own files are removed)",
    )
    run.add_argument("--resume", action="store_true", help="continue training from the run's last checkpoint")
    run.set_defaults(handler=_run)

    evaluate = commands.add_parser("eval", help="evaluate a model or a run directory's model/")
    evaluate.add_argument("model", help="run directory, local model directory, alias, or hub id")
    evaluate.add_argument("--data", default="embedded-docs", help="text source for perplexity and tasks")
    evaluate.add_argument(
        "--seq-len", type=int, default=None, help="tokens per window (default: a run's own data.seq_len, else 512)"
    )
    evaluate.add_argument("--tasks", nargs="*", default=["docs_lastword"], help="lm-eval task names")
    evaluate.add_argument(
        "--extra-texts",
        nargs="*",
        default=list(EXTRA_TEXTS),
        help="out-of-domain texts whose test-part perplexity is reported too (none: --extra-texts)",
    )
    evaluate.add_argument("--limit", type=int, default=200, help="examples per task")
    evaluate.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    evaluate.add_argument("--no-perplexity", action="store_true", help="skip the perplexity (and extra texts)")
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (as runtime.device)")
    evaluate.add_argument(
        "--dtype", default="auto", help="auto (the checkpoint's) | float32 | bfloat16 | float16 (as runtime.dtype)"
    )
    evaluate.add_argument(
        "--output",
        help="directory for eval.json and eval.md (default: beside the model: the run or model directory given; "
        "runs/eval/<name> for an alias or Hub id); a file there that MaskPrune did not write is never replaced",
    )
    evaluate.set_defaults(handler=_eval)

    export = commands.add_parser("export", help="write <run>/model/ from the base model and the saved masks")
    export.add_argument("run_dir")
    export.set_defaults(handler=_export)

    sweep = commands.add_parser("sweep", help="run a grid of methods x sparsity levels and compare them")
    sweep.add_argument("recipe", help="sweep YAML, e.g. recipes/sweeps/smollm2-135m.yaml")
    sweep.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a sweep key (grid.methods=[wanda]) or, for any other key, every point's recipe",
    )
    sweep.add_argument("--output", help="sweep directory (default: the sweep's `output`)")
    sweep.add_argument(
        "--force", action="store_true", help="recompute finished points, the dense figures and statistics"
    )
    sweep.add_argument(
        "--sensitivity",
        action="store_true",
        help="instead of the grid: prune one block / layer type at a time and rank the damage",
    )
    sweep.set_defaults(handler=_sweep)

    compare = commands.add_parser("compare", help="the sweep table and plots from existing run directories")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (or sweep directories)")
    compare.add_argument("--output", default="runs/compare", help="where to write compare.{csv,json,md} and plots")
    compare.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous comparison in the output directory (only its own files are removed)",
    )
    compare.set_defaults(handler=_compare)

    models = commands.add_parser("models", help="list the embedded model aliases and what is cached")
    models.set_defaults(handler=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    from prune.core.errors import UserInputError

    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserInputError as error:
        _refuse_once(f"error: {error}")
        return 2
    except NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        if error.errno not in DISK_ERRORS:
            raise
        print(
            textwrap.fill(_disk_message(error), width=100, break_on_hyphens=False, break_long_words=False),
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"interrupted; {interrupt}" if isinstance(interrupt, Interrupted) else "interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
