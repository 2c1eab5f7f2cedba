"""Load whatever a recipe or `prune eval` names: an alias, a model directory, a Hub id, a run directory (its
model/, or the method's own restore for per-input gating), or, through the task that loads that kind of model
(prune.tasks), a structural export with per-layer sizes, a CLIP model or an image classifier."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from prune.core.errors import UserInputError
from prune.methods.registry import METHODS, get_method
from prune.models import loading
from prune.runs import run_dir
from prune.tasks.data_config import DEFAULT_TASK
from prune.tasks.registry import get_task


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, *, task: str = DEFAULT_TASK
) -> tuple[PreTrainedModel, object]:
    """(model in eval mode, tokenizer or processor) for any model MaskPrune accepts: an alias, a directory, a Hub
    id, or a run directory, which loads as the task it was run with."""
    with loading.checkpoint_errors(name_or_path):
        return _load_any(name_or_path, dtype, task)


def _load_any(name_or_path: str, dtype: torch.dtype, task: str) -> tuple[PreTrainedModel, object]:
    alias_task = loading.VISION_ALIASES.get(name_or_path, (task,))[0]
    if alias_task != task:
        raise UserInputError(f"{name_or_path!r} is an image model; use it with `task: {alias_task}`.")
    path = Path(name_or_path).expanduser()
    if (path / run_dir.RECIPE_FILE).is_file() and not loading.is_model_dir(path):
        return _from_run(path, dtype)
    return get_task(task).load_model(name_or_path, dtype)


def _from_run(directory: Path, dtype: torch.dtype):
    """A `prune run` directory: its model/ when the method's pruned model is a plain checkpoint; else the method
    rebuilds the pruned model from the run's saved state (thresholds, predictors) over the base model, or, after
    recovery under input masks (activation sparsity), over model/, which holds the recovered weights."""
    recipe = run_dir.read_recipe(directory)  # only `model`, `task`, `method`, `recover` and `export` are needed
    task = recipe.get("task") or DEFAULT_TASK
    saved = directory / run_dir.MODEL_DIR
    method = recipe.get("method") if isinstance(recipe.get("method"), dict) else {}
    declared = METHODS.get(method.get("name"))
    if declared is None or declared.plain_model:
        if loading.is_model_dir(saved):
            return load_model(str(saved), dtype, task=task)
        raise UserInputError(f"run {directory} has no {run_dir.MODEL_DIR}/: {_why_no_model(directory, recipe)}")
    spec = get_method(declared.name)
    try:
        config = spec.config_class.model_validate(method)
    except ValueError as error:
        raise UserInputError(f"the method section of {directory / run_dir.RECIPE_FILE} is invalid: {error}") from None
    recovered = bool((recipe.get("recover") or {}).get("steps"))
    if recovered and not loading.is_model_dir(saved):
        raise UserInputError(
            f"run {directory} trains its weights in recovery, and its {run_dir.MODEL_DIR}/, which holds them, is "
            f"missing (the run is unfinished, or {run_dir.MODEL_DIR}/ was removed); the base model without them "
            f"would be another model. Rerun it (`prune run RECIPE --output {directory} --resume` continues an "
            "interrupted recovery from its checkpoint)."
        )
    model, processor = load_model(str(saved) if recovered else recipe["model"], dtype, task=task)
    return spec.restore(model, directory, config), processor


def _why_no_model(directory: Path, recipe: dict) -> str:
    """Why a run directory holds no model/, and what writes it: the run never finished, or it did not save one."""
    if not (directory / run_dir.REPORT_FILE).is_file():
        return (
            "the run is unfinished (no report.json). Finish it (`prune run RECIPE --output "
            f"{directory} --resume` for a learnable method that checkpointed), or rerun it."
        )
    if (recipe.get("export") or {}).get("save_model") is False:
        return (
            f"the run had export.save_model: false. Write it with `prune export {directory}`, then load the run again."
        )
    return f"it was removed. Rebuild it with `prune export {directory}`, then load the run again."
