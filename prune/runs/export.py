"""Rebuild a run's `model/` from the base model and its saved masks, through the method's own load and export
hooks (weight masks: merged into the weights; structural methods: the smaller model)."""
from __future__ import annotations

from pathlib import Path

from prune.runs import run_dir
from prune.core.errors import UserInputError
from prune.runs.loading import load_model
from prune.runs.recipe import parse_recipe
from prune.methods.registry import get_method
from prune.core.yaml_io import load_yaml


def export_run(directory: str | Path) -> Path:
    """Write `<run>/model/`, loadable by plain `AutoModelForCausalLM.from_pretrained` (or the task's class)."""
    directory = run_dir.require_run(directory)
    raw = load_yaml((directory / run_dir.RECIPE_FILE).read_text())
    method = (raw.get("method") or {}).get("name") if isinstance(raw, dict) else None
    if isinstance(method, str) and get_method(method).restore is not None:
        raise UserInputError(
            f"{directory} was pruned by {method}, whose model chooses what to compute per input and so "
            "has no plain-checkpoint form; the run directory itself holds it: load it with "
            f"prune.load_model({str(directory)!r}) (base model + the saved predictors)."
        )
    recipe = parse_recipe(raw)
    if recipe.method.changes_weights:
        raise UserInputError(
            f"{directory} was pruned by {recipe.method.name} with weight updates, which the masks alone cannot "
            "rebuild; its model/ was written by `prune run` (rerun with export.save_model: true if it is missing)."
        )
    spec = get_method(recipe.method.name)
    model, tokenizer = load_model(recipe.model, task=recipe.task)  # a CLIP run: the model and its processor
    spec.load(model, directory, recipe.method)
    model_dir = directory / run_dir.MODEL_DIR
    run_dir.save_model_atomic(spec.export(model, recipe.method), tokenizer, model_dir)
    return model_dir
