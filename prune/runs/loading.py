"""Load whatever a recipe or `prune eval` names: an alias, a model directory, a Hub id, a run directory (its
model/, or the method's own restore for per-input gating), a structural export with per-layer sizes, or a
CLIP model for `task: zero-shot-classification`."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from prune.core.errors import UserInputError
from prune.core.yaml_io import load_yaml
from prune.methods.registry import get_method
from prune.models import loading
from prune.models.clip import load_clip
from prune.runs import run_dir
from prune.structural.shrink import has_layer_sizes, load_resized
from prune.tasks.zero_shot import TASK as ZERO_SHOT


def load_model(spec: str, dtype: torch.dtype = torch.float32, *, task: str = "causal-lm") -> tuple[PreTrainedModel, object]:
    """(model in eval mode, tokenizer or processor) for any model spec MaskPrune accepts."""
    if task == ZERO_SHOT or spec in loading.VISION_ALIASES:
        if task != ZERO_SHOT:
            raise UserInputError(f"{spec!r} is a CLIP model; use it with `task: {ZERO_SHOT}`.")
        return load_clip(spec, dtype)
    path = Path(spec).expanduser()
    if (path / run_dir.RECIPE_FILE).is_file() and not loading.is_model_dir(path):
        return _from_run(path, dtype)
    if path.is_dir() and has_layer_sizes(str(path)):  # a structural export whose layers differ in size
        return load_resized(str(path), dtype).eval(), loading.load_tokenizer(str(path))
    return loading.load(spec, dtype)


def _from_run(directory: Path, dtype: torch.dtype):
    """A `prune run` directory: its model/ when the run wrote one; else the method rebuilds the pruned model
    from the base model and the run's saved state (per-input gating: base model + predictors)."""
    if loading.is_model_dir(directory / run_dir.MODEL_DIR):
        return load_model(str(directory / run_dir.MODEL_DIR), dtype)
    recipe = load_yaml((directory / run_dir.RECIPE_FILE).read_text())  # only `model` and `method` are needed
    method = recipe.get("method") or {}
    spec = get_method(method.get("name", "?"))
    if spec.restore is None:
        raise UserInputError(
            f"run {directory} has no {run_dir.MODEL_DIR}/ (export.save_model was false); write it with "
            f"`prune export {directory}`, then load the run again."
        )
    try:
        config = spec.config_class.model_validate(method)
    except ValueError as error:
        raise UserInputError(f"the method section of {directory / run_dir.RECIPE_FILE} is invalid: {error}") from None
    model, tokenizer = load_model(recipe["model"], dtype)
    return spec.restore(model, directory, config), tokenizer
