"""Rebuild a run's `model/` from the base model and its saved masks (hard masks merged into the weights)."""
from __future__ import annotations

from pathlib import Path

from prune.runs import run_dir
from prune.core.errors import UserInputError
from prune.masks.base import merge
from prune.masks.storage import load_masks, read_masks
from prune.structural.store import export_gated, is_structural, load_gates
from prune.runs.loading import load_model
from prune.runs.recipe import parse_recipe
from prune.methods.registry import get_method
from prune.core.yaml_io import load_yaml


def export_run(directory: str | Path) -> Path:
    """Write `<run>/model/`, loadable by plain `AutoModelForCausalLM.from_pretrained`."""
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
    if is_structural(directory):  # heads / neurons / hidden / layers: the smaller model, rebuilt from the decisions
        model, tokenizer = load_model(recipe.model)
        load_gates(model, directory)
        model_dir = directory / run_dir.MODEL_DIR
        run_dir.save_model_atomic(export_gated(model, recipe.method), tokenizer, model_dir)
        return model_dir
    _, meta = read_masks(directory)
    if meta.get("weights_changed"):
        raise UserInputError(
            f"{directory} was pruned by {meta['method']} with weight updates, which the masks alone cannot "
            "rebuild; its model/ was written by `prune run` (rerun with export.save_model: true if it is missing)."
        )
    model, tokenizer = load_model(recipe.model, task=recipe.task)  # a CLIP run: the model and its processor
    load_masks(model, directory)
    merge(model)
    model_dir = directory / run_dir.MODEL_DIR
    run_dir.save_model_atomic(model, tokenizer, model_dir)
    return model_dir
