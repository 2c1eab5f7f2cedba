"""The one orchestrator: recipe -> model/data -> masks -> (train) -> export -> evaluate -> run directory.

Each stage takes the previous stage's output and nothing else; `timings` records how long each took.
Under `accelerate launch` every process prunes and trains, and only the main process evaluates and writes.
"""
from __future__ import annotations

import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import load_file

from eval.perplexity import perplexity
from eval.report import write_json_atomic
from prune import run_dir
from prune.data import TokenSplits, prepare
from prune.errors import UserInputError
from prune.masks.base import achieved_sparsity
from prune.measure import measure
from prune.models import load
from prune.recipe import Recipe
from prune.registry import get_method
from prune.report import write_report
from prune.train import TrainResult, train, trainable_parameters

DENSE_FILE = "dense.json"


@contextmanager
def timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 2)


def run(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> dict | None:
    """Prune `recipe.model` as the recipe says and write the run directory; returns report.json's content
    (None on the non-main processes of a distributed run)."""
    spec = get_method(recipe.method.name)
    if spec.kind == "oneshot" and recipe.train.steps:
        raise UserInputError(f"method {spec.name!r} is one-shot; train.steps applies to learnable methods only.")
    if resume and spec.kind == "oneshot":
        raise UserInputError(f"method {spec.name!r} is one-shot and has nothing to resume; run without --resume.")
    state = PartialState()
    directory = Path(recipe.output)
    if state.is_main_process:
        run_dir.claim(directory, recipe.to_dict(), overwrite=overwrite, resume=resume)
    state.wait_for_everyone()
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
    if recipe.eval.dense_baseline and state.is_main_process:
        with timed(timings, "dense_eval"):
            dense = _dense_figures(model, tokenizer, splits, recipe, directory, resume)

    with timed(timings, "prune"):
        objective = spec.attach(model, recipe.method, calibration)
    training = None
    if spec.kind == "learnable" and recipe.train.steps:
        with timed(timings, "train"):
            training = _train(model, objective, splits, recipe, directory, resume)
    if not state.is_main_process:
        return None

    achieved = achieved_sparsity(model)
    meta = {
        "model": recipe.model,
        "method": spec.name,
        "config": recipe.to_dict()["method"],
        "weights_changed": recipe.method.changes_weights,
    }
    spec.save(model, directory, recipe.method, meta)

    model = spec.export(model, recipe.method)
    with timed(timings, "pruned_eval"):
        pruned = measure(model, tokenizer, splits, recipe.eval, seq_len, "pruned")
    if recipe.export.save_model:
        with timed(timings, "save_model"):
            run_dir.save_model_atomic(model, tokenizer, directory / run_dir.MODEL_DIR)

    report = {
        "model": recipe.model,
        "method": spec.name,
        "recipe_fingerprint": recipe.fingerprint(),
        "sparsity": {"target": recipe.method.target_label(), "achieved": achieved},
        **{key: value for key, value in pruned.items() if key != "seconds"},
        "timings": timings,
        "memory": {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
    }
    if training is not None:
        report["train"] = {
            "steps": training.steps, "best_step": training.best_step,
            "best_eval_perplexity": training.best_score, "seconds": round(training.seconds, 2),
        }
    if dense is not None:
        report["dense"] = dense
        if "perplexity" in dense:
            report["perplexity"]["dense"] = dense["perplexity"]["value"]
    write_report(directory, report)
    return report


def _dense_figures(model, tokenizer, splits: TokenSplits, recipe: Recipe, directory: Path, resume: bool) -> dict:
    """The dense baseline, measured once per run directory (a resumed run reuses it)."""
    saved = directory / DENSE_FILE
    if resume and saved.is_file():
        return json.loads(saved.read_text())
    figures = measure(model, tokenizer, splits, recipe.eval, recipe.data.seq_len, "dense")
    write_json_atomic(saved, figures)
    return figures


def _train(model, objective, splits: TokenSplits, recipe: Recipe, directory: Path, resume: bool) -> TrainResult:
    """Train the masks on the train split; periodic held-out perplexity picks the best masks, which are kept."""
    heldout = splits.heldout_blocks(recipe.data.seq_len)[: recipe.train.eval_windows]

    def evaluate(masked_model) -> float:
        return perplexity(masked_model, heldout, desc="eval hard masks").value

    result = train(
        model, objective, splits.train_blocks(recipe.data.seq_len), recipe.train, directory,
        evaluate=evaluate, resume=resume,
    )
    best = directory / "train" / "best.safetensors"
    if result.best_step is not None and best.is_file():
        params = trainable_parameters(model, objective)
        for name, value in load_file(best).items():
            params[name].data.copy_(value)
    return result
