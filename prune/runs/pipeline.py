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
import torch

from eval.perplexity import perplexity
from prune.core.atomic import write_json_atomic
from prune.runs import run_dir
from prune.data import images
from prune.tasks import zero_shot
from prune.data.text import TokenSplits, prepare
from prune.core.errors import UserInputError
from prune.masks.base import achieved_sparsity
from prune.tasks.causal_lm import measure
from prune.runs.loading import load_model
from prune.runs.placed import attach_kwargs, place, prepare_runtime, run_streamed
from prune.runs.recipe import Recipe
from prune.methods.registry import get_method
from prune.runs.report import write_report
from prune.core.rng import seed_all
from prune.training.checkpoint import load_params
from prune.training.curve import training_curve
from prune.training.trainer import TrainResult, train, trainable_parameters

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
    runtime = prepare_runtime(recipe)
    state = PartialState(cpu=runtime.device.type == "cpu")  # the trainer's Accelerator follows runtime.device
    directory = Path(recipe.output)
    if state.is_main_process:
        run_dir.claim(directory, recipe.to_dict(), overwrite=overwrite, resume=resume)
    state.wait_for_everyone()
    timings: dict[str, float] = {}
    if recipe.task == zero_shot.TASK:
        return _run_zero_shot(recipe, spec, state, directory, timings, resume)
    if runtime.streams:
        return run_streamed(recipe, runtime, directory, timings, timed)
    seq_len = recipe.data.seq_len

    with timed(timings, "load"):
        model, tokenizer = load_model(recipe.model, runtime.dtype)
        model = place(model, runtime)
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
            dense = _dense_figures(model, tokenizer, splits, recipe, directory, resume, runtime.device)

    with timed(timings, "prune"):
        seed_all(recipe.seed)  # random initial values (e.g. `prior: none` logits) follow the recipe's seed
        objective = spec.attach(model, recipe.method, calibration, **attach_kwargs(spec, runtime))
    training = None
    if spec.kind == "learnable" and recipe.train.steps:
        with timed(timings, "train"):
            training = _train(model, objective, splits, recipe, directory, resume, runtime.device)
    if not state.is_main_process:
        return None
    if training is not None:
        _plot_training(directory, recipe, seq_len * state.num_processes, "tokens")

    achieved = achieved_sparsity(model)
    meta = {
        "model": recipe.model,
        "method": spec.name,
        "config": recipe.to_dict()["method"],
        "weights_changed": recipe.method.changes_weights,
    }
    spec.save(model, directory, recipe.method, meta)

    plain = spec.restore is None  # else no plain checkpoint exists: the run dir restores via prune.models.loading.load
    if plain:
        model = spec.export(model, recipe.method)
    with timed(timings, "pruned_eval"):
        pruned = measure(model, tokenizer, splits, recipe.eval, seq_len, "pruned", runtime.device)
    if recipe.export.save_model and plain:
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
    if spec.report is not None:  # figures only the method can measure (e.g. FLOPs of per-input masks)
        with timed(timings, "method_report"):
            report.update(spec.report(model, recipe.method, splits.heldout_blocks(seq_len), report))
    write_report(directory, report)
    return report


def _dense_figures(model, tokenizer, splits: TokenSplits, recipe: Recipe, directory: Path, resume: bool,
                   device: torch.device) -> dict:
    """The dense baseline, measured once per run directory (a resumed run reuses it)."""
    return _cached_dense(directory, resume, lambda: measure(model, tokenizer, splits, recipe.eval, recipe.data.seq_len,
                                                            "dense", device))


def _cached_dense(directory: Path, resume: bool, compute) -> dict:
    saved = directory / DENSE_FILE
    if resume and saved.is_file():
        return json.loads(saved.read_text())
    figures = compute()
    write_json_atomic(saved, figures)
    return figures


def _train(model, objective, splits: TokenSplits, recipe: Recipe, directory: Path, resume: bool,
           device: torch.device) -> TrainResult:
    """Train the masks on the train split; periodic held-out perplexity picks the best masks, which are kept."""
    heldout = splits.heldout_blocks(recipe.data.seq_len)[: recipe.train.eval_windows]

    def evaluate(masked_model) -> float:
        return perplexity(masked_model, heldout, desc="eval hard masks").value

    blocks = splits.train_blocks(recipe.data.seq_len)
    fraction = getattr(recipe.data, "fraction", 1.0)
    if fraction < 1.0:  # a seeded share of the blocks (VTrans' Fast variant)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(recipe.seed))
        blocks = blocks[order[: max(1, round(fraction * len(blocks)))]]
    result = train(model, objective, blocks, recipe.train, directory, evaluate=evaluate, resume=resume, device=device)
    _keep_best(model, objective, directory, result)
    return result


def _plot_training(directory: Path, recipe: Recipe, units_per_sample: int, unit: str) -> None:
    """train_curve.png: held-out score of the hard masks vs training tokens/images seen (all processes)."""
    per_step = recipe.train.batch_size * recipe.train.grad_accum * units_per_sample
    training_curve(directory / "train" / "train_log.jsonl", per_step, unit, directory / "train_curve.png")


def _keep_best(model, objective, directory: Path, result: TrainResult) -> None:
    """Load the masks of the best periodic evaluation (when there was one) back into the model."""
    best = directory / "train" / "best.safetensors"
    if result.best_step is not None and best.is_file():
        load_params(best, trainable_parameters(model, objective), "Start the run over with --overwrite.")


def _run_zero_shot(recipe: Recipe, spec, state, directory: Path, timings: dict, resume: bool) -> dict | None:
    """`task: zero-shot-classification`: a CLIP model on images. The same stages and report as an LLM run, with
    zero-shot accuracy (class prompts) as the dense figures and the tuned model's accuracy after."""
    from prune.methods.binary.method import masked_fractions

    if spec.needs_calibration or spec.restore is not None:
        raise UserInputError(
            f"method {spec.name!r} needs calibration text or a per-input model, which task zero-shot-classification "
            "does not have; use method binary (R-AMT mask tuning) or magnitude."
        )
    data_config, limit = recipe.data, recipe.eval.limit
    with timed(timings, "load"):
        model, processor = load_model(recipe.model, task=recipe.task)
        data = images.load_image_data(data_config, processor.image_processor, recipe.seed)
        classifier = zero_shot.ZeroShotClassifier(model, processor.tokenizer, data.class_names, data_config.templates)
        data.notes["heldout_images"] = min(limit or len(data.heldout), len(data.heldout))  # what accuracy counts

    def figures() -> dict:
        return zero_shot.measure(classifier, data, limit, data_config.batch_size)

    dense = None
    if recipe.eval.dense_baseline and state.is_main_process:
        with timed(timings, "dense_eval"):
            dense = _cached_dense(directory, resume, figures)
    with timed(timings, "prune"):
        seed_all(recipe.seed)
        objective = spec.attach(model, recipe.method, None)
    training = None
    if spec.kind == "learnable" and recipe.train.steps:
        def error(masked) -> float:
            return 1.0 - zero_shot.zero_shot_accuracy(masked, data.heldout, data_config.batch_size, limit)

        with timed(timings, "train"):
            training = train(classifier, objective, data.train, recipe.train, directory, task_loss=zero_shot.classification_loss,
                             evaluate=error, eval_metric="error", resume=resume)
            _keep_best(classifier, objective, directory, training)
    if not state.is_main_process:
        return None
    if training is not None:
        _plot_training(directory, recipe, state.num_processes, "images")

    masked = masked_fractions(model)
    meta = {"model": recipe.model, "method": spec.name, "config": recipe.to_dict()["method"], "weights_changed": False}
    spec.save(model, directory, recipe.method, meta)
    model = classifier.clip = spec.export(model, recipe.method)
    with timed(timings, "pruned_eval"):
        tuned = figures()
    if recipe.export.save_model:
        with timed(timings, "save_model"):
            run_dir.save_model_atomic(model, processor, directory / run_dir.MODEL_DIR)
    report = {
        "model": recipe.model,
        "method": spec.name,
        "task": recipe.task,
        "recipe_fingerprint": recipe.fingerprint(),
        "sparsity": {"target": recipe.method.target_label(), "achieved": masked["targeted"]},
        "masked": masked,
        **{key: value for key, value in tuned.items() if key != "seconds"},
        "eval_data": data.notes,
        "timings": timings,
        "memory": {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
    }
    if training is not None:
        report["train"] = {"steps": training.steps, "best_step": training.best_step,
                           "best_eval_error": training.best_score, "seconds": round(training.seconds, 2)}
    if dense is not None:
        report["dense"] = dense
    write_report(directory, report)
    return report
