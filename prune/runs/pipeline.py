"""The one orchestrator: recipe -> model/data -> masks -> (train) -> export -> (recover) -> evaluate -> run directory.

A method without a plain checkpoint form (per-input masks: MethodSpec.restore) writes no model/, except after
recovery under input masks (activation sparsity): model/ then holds the trained weights without the wrappers, and
prune.load_model(run_dir) puts the saved thresholds back on them.

One flow for every kind of model: what differs between a causal LM, CLIP as a zero-shot classifier and an
image classifier (loading, data, training loss, held-out score, figures, report fields) is the recipe's task
(prune.tasks), and so is how the model is held: in memory, or under `runtime.offload: disk` streamed from its
shards block by block (prune.runs.placed.open_task picks the task's variant). What differs between methods is
their MethodSpec's hooks. Each stage takes the previous stage's output and nothing else; `timings` records how
long each took. Under `accelerate launch` every process prunes and trains, and only the main process evaluates
and writes.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from accelerate import PartialState

from prune.core.atomic import write_json_atomic
from prune.core.rng import seed_all
from prune.masks.base import unwrapped, weight_masks
from prune.methods.registry import get_method
from prune.methods.spec import MethodSpec, masks_meta
from prune.recovery.stage import STAGE, recover
from prune.runs import run_dir
from prune.runs.placed import block_placement, open_task, prepare_runtime
from prune.runs.preflight import check_recipe
from prune.runs.provenance import CONFIG_FILE, write_record
from prune.runs.recipe import Recipe
from prune.runs.report import recovery_section, run_report, timed, training_section, with_dense, write_report
from prune.tasks.base import Task
from prune.training.checkpoint import POINTER
from prune.training.config import TrainConfig
from prune.training.curve import training_curve
from prune.training.trainer import TrainResult, keep_best, train


def run(recipe: Recipe, *, overwrite: bool = False, resume: bool = False) -> dict | None:
    """Prune `recipe.model` as the recipe says and write the run directory; returns report.json's content
    (None on the non-main processes of a distributed run). Everything that can be checked without computing
    (the recipe, the output directory, the model, the data) is checked before the output is claimed, and the
    claim's lock is released however the run ends."""
    try:
        return _run(recipe, overwrite=overwrite, resume=resume)
    finally:
        run_dir.release(recipe.output)


def _claim(recipe: Recipe, state: PartialState, overwrite: bool, resume: bool) -> None:
    if state.is_main_process:
        run_dir.claim(recipe.output, recipe.to_dict(), overwrite=overwrite, resume=resume)
    state.wait_for_everyone()


def _run(recipe: Recipe, *, overwrite: bool, resume: bool) -> dict | None:
    spec = get_method(recipe.method.name)
    check_recipe(recipe, spec, resume)
    runtime = prepare_runtime(recipe)
    state = PartialState(cpu=runtime.device.type == "cpu")  # the trainer's Accelerator follows runtime.device
    if state.is_main_process:
        run_dir.check(recipe.output, recipe.to_dict(), overwrite=overwrite, resume=resume)
    directory = Path(recipe.output)
    timings: dict[str, float] = {}
    with timed(timings, "load"):
        task = open_task(recipe, spec, runtime, directory / run_dir.MODEL_DIR)  # model checked before any data
        task.check_data(spec)  # every part of the data holds what the run needs, before any forward
        calibration = task.calibration() if spec.needs_calibration else None
    _claim(recipe, state, overwrite, resume)
    dense = None
    if recipe.eval.dense_baseline and state.is_main_process:
        with timed(timings, "dense_eval"):
            dense = _cached_dense(directory, resume, lambda: task.measure("dense"))

    with timed(timings, "prune"):
        seed_all(recipe.seed)  # random initial values (e.g. `prior: none` logits) follow the recipe's seed
        objective = task.apply_method(spec, recipe.method, calibration, block_placement(runtime))
    training = None
    if spec.kind == "learnable" and recipe.train.steps:
        with timed(timings, "train"):
            training = _train(task, objective, recipe, directory, resume, runtime.device)
    main = state.is_main_process
    if not main and not recipe.recover.steps:  # only the main process evaluates and writes
        return None
    if main:
        if training is not None:
            _plot_training(directory, _per_step(recipe.train, task, state.num_processes), task.unit)
        achieved = task.sparsity()
        fields = task.fields()  # taken while the masks are attached
        meta = masks_meta(recipe.model, recipe.method, recovered=bool(recipe.recover.steps))
        task.save_masks(spec, directory, recipe.method, meta)

    masks = weight_masks(task.model) if recipe.recover.steps else {}  # what recovery keeps fixed (export merges)
    plain = spec.restore is None  # else no plain checkpoint exists: the run dir restores via prune.runs.loading
    if plain:
        task.export(spec, recipe.method)
    if main:
        with timed(timings, "pruned_eval"):
            figures = task.measure("pruned")  # the figures of the model the run ends with
    recovery = before_recovery = None
    if recipe.recover.steps:  # every process trains; the main process measures again and writes
        state.wait_for_everyone()
        with timed(timings, "recover"):
            recovery = _recover(task, masks, recipe, directory, resume, runtime.device)
        if not main:
            return None
        _plot_training(directory, _per_step(recipe.recover, task, state.num_processes), task.unit, recovery=True)
        with timed(timings, "recovered_eval"):
            before_recovery, figures = figures, task.measure("recovered")
    saves = plain or recovery is not None  # recovered weights under input masks (activation) are saved bare too
    if recipe.export.save_model and saves:
        with timed(timings, "save_model"), unwrapped(task.model):
            task.save_model(directory / run_dir.MODEL_DIR)
    if saves and (directory / run_dir.MODEL_DIR / CONFIG_FILE).is_file():  # saved here, or streamed by the task
        write_record(directory / run_dir.MODEL_DIR, recipe.method, recipe.recover.mode if recovery else None)

    report = _report(recipe, spec, task, achieved, fields, figures, timings, training, dense, state.num_processes)
    if recovery is not None:
        trained = training_section(
            recovery, task.metric, task.unit, _per_step(recipe.recover, task, state.num_processes)
        )
        report["recover"] = recovery_section(recipe.recover, trained, before_recovery, figures)
    write_report(directory, report)
    return report


def _report(
    recipe: Recipe,
    spec: MethodSpec,
    task: Task,
    achieved: float,
    fields: dict,
    pruned: dict,
    timings: dict,
    training: TrainResult | None,
    dense: dict | None,
    processes: int,
) -> dict:
    """report.json's content: the run, the pruned model's figures, the task's fields, the dense baseline and
    the figures only the method can measure (e.g. FLOPs of per-input masks). `train.<unit>_seen`: the tokens
    (images) training read, all processes together."""
    report = run_report(recipe, fields, achieved, pruned, timings)
    if training is not None:
        report["train"] = training_section(training, task.metric, task.unit, _per_step(recipe.train, task, processes))
    if dense is not None:
        with_dense(report, dense)
    if spec.report is not None:
        with timed(timings, "method_report"):
            report.update(spec.report(task.module, recipe.method, task.heldout(), report))
    return report


def _cached_dense(directory: Path, resume: bool, compute) -> dict:
    """The dense baseline, measured once per run directory (a resumed run reuses it)."""
    saved = directory / run_dir.DENSE_FILE
    if resume and saved.is_file():
        return json.loads(saved.read_text())
    figures = compute()
    write_json_atomic(saved, figures)
    return figures


def _train(task: Task, objective, recipe: Recipe, directory: Path, resume: bool, device: torch.device) -> TrainResult:
    """Train the masks on the task's training data (on `device`, runtime.device); the periodic held-out score
    picks the best masks, which are kept."""
    result = train(
        task.module,
        objective,
        task.train_data(),
        recipe.train,
        directory,
        task_loss=partial(task.loss, stage=recipe.train),
        evaluate=partial(task.heldout_score, stage=recipe.train),
        eval_metric=task.metric,
        resume=resume,
        device=device,
        shaping=_loss_settings(recipe),
    )
    keep_best(task.module, objective, directory, result)
    return result


def _recover(task: Task, masks: dict, recipe: Recipe, directory: Path, resume: bool, device: torch.device):
    """Recovery training of the exported model's kept weights (prune.recovery), `masks` fixed; the best
    validation step is kept. A resumed run continues recovery from its checkpoint when it got that far."""
    resumable = (directory / run_dir.RECOVER_CHECKPOINTS / POINTER).is_file()
    return recover(
        task.model,
        recipe.recover,
        task.train_data(),
        directory,
        masks=masks,
        module=task.module,
        task_loss=partial(task.loss, stage=recipe.recover),
        evaluate=partial(task.heldout_score, stage=recipe.recover),
        eval_metric=task.metric,
        resume=resume and resumable,
        device=device,
        shaping=[f"recover.mode={recipe.recover.mode}"]
        + ([f"recover.distill={recipe.recover.distill:g}"] if recipe.recover.distill else []),
    )


def _loss_settings(recipe: Recipe) -> list[str]:
    """The method's numeric settings this recipe changed from their defaults (and train.distill): what a
    non-finite loss message names besides train.lr."""
    method = recipe.method
    changed = [
        f"method.{key}={value:g}"
        for key, field in type(method).model_fields.items()
        if key != "sparsity"
        and isinstance(value := getattr(method, key), (int, float))
        and not isinstance(value, bool)
        and value != field.get_default(call_default_factory=True)
    ]
    return changed + ([f"train.distill={recipe.train.distill:g}"] if recipe.train.distill else [])


def _per_step(stage: TrainConfig, task: Task, processes: int) -> int:
    """Tokens (images) one optimizer step of `stage` (recipe.train or recipe.recover) reads, all processes
    together."""
    return stage.batch_size * stage.grad_accum * task.sample_size * processes


def _plot_training(directory: Path, per_step: int, unit: str, *, recovery: bool = False) -> None:
    """train_curve.png (recover_curve.png): the held-out score vs training tokens/images seen (all processes)."""
    logs, curve = (STAGE, run_dir.RECOVER_CURVE) if recovery else (run_dir.TRAIN_DIR, run_dir.CURVE_FILE)
    training_curve(directory / logs / "train_log.jsonl", per_step, unit, directory / curve)
