"""The one orchestrator: recipe -> model/data -> masks -> (train) -> export -> evaluate -> run directory.

Each stage takes the previous stage's output and nothing else; `timings` records how long each took.
"""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager

from prune import run_dir
from prune.data import prepare
from prune.errors import UserInputError
from prune.masks.base import achieved_sparsity, merge
from prune.masks.storage import save_masks
from prune.measure import measure
from prune.models import load
from prune.recipe import Recipe
from prune.registry import get_method
from prune.report import write_report


@contextmanager
def timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 2)


def run(recipe: Recipe, *, overwrite: bool = False) -> dict:
    """Prune `recipe.model` as the recipe says and write the run directory; returns report.json's content."""
    spec = get_method(recipe.method.name)
    if spec.kind == "oneshot" and recipe.train.steps:
        raise UserInputError(f"method {spec.name!r} is one-shot; train.steps applies to learnable methods only.")
    directory = run_dir.claim(recipe.output, recipe.to_dict(), overwrite=overwrite)
    timings: dict[str, float] = {}
    seq_len = recipe.data.seq_len

    with timed(timings, "load"):
        model, tokenizer = load(recipe.model)
        data = recipe.data
        splits = prepare(
            tokenizer, data.source, config=data.config, split=data.split, heldout_split=data.heldout_split,
            text_column=data.text_column, heldout_fraction=data.heldout_fraction,
        )
        calibration = (
            splits.calibration_blocks(data.calibration_samples, seq_len, recipe.seed) if spec.needs_calibration else None
        )
    dense = None
    if recipe.eval.dense_baseline:
        with timed(timings, "dense_eval"):
            dense = measure(model, tokenizer, splits, recipe.eval, seq_len, "dense")

    with timed(timings, "prune"):
        spec.attach(model, recipe.method, calibration)
    pattern = recipe.method.pattern
    achieved = achieved_sparsity(model)
    meta = {
        "model": recipe.model,
        "method": spec.name,
        "config": recipe.to_dict()["method"],
        "weights_changed": recipe.method.changes_weights,
    }
    save_masks(model, directory, meta, nm=(pattern.n, pattern.m) if pattern.is_nm else None)

    merge(model)
    with timed(timings, "pruned_eval"):
        pruned = measure(model, tokenizer, splits, recipe.eval, seq_len, "pruned")
    if recipe.export.save_model:
        with timed(timings, "save_model"):
            run_dir.save_model_atomic(model, tokenizer, directory / run_dir.MODEL_DIR)

    report = {
        "model": recipe.model,
        "method": spec.name,
        "recipe_fingerprint": recipe.fingerprint(),
        "sparsity": {"target": str(pattern), "achieved": achieved},
        **{key: value for key, value in pruned.items() if key != "seconds"},
        "timings": timings,
        "memory": {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
    }
    if dense is not None:
        report["dense"] = dense
        if "perplexity" in dense:
            report["perplexity"]["dense"] = dense["perplexity"]["value"]
    write_report(directory, report)
    return report
