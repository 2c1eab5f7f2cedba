"""Rebuild a run's `model/` from the base model and its saved masks (hard masks merged into the weights)."""
from __future__ import annotations

from pathlib import Path

from prune import run_dir
from prune.errors import UserInputError
from prune.masks.base import merge
from prune.masks.storage import load_masks, read_masks
from prune.models import load
from prune.recipe import parse_recipe
from prune.yaml_io import load_yaml


def export_run(directory: str | Path) -> Path:
    """Write `<run>/model/`, loadable by plain `AutoModelForCausalLM.from_pretrained`."""
    directory = run_dir.require_run(directory)
    recipe = parse_recipe(load_yaml((directory / run_dir.RECIPE_FILE).read_text()))
    _, meta = read_masks(directory)
    if meta.get("weights_changed"):
        raise UserInputError(
            f"{directory} was pruned by {meta['method']} with weight updates, which the masks alone cannot "
            "rebuild; its model/ was written by `prune run` (rerun with export.save_model: true if it is missing)."
        )
    model, tokenizer = load(recipe.model)
    load_masks(model, directory)
    merge(model)
    target = directory / run_dir.MODEL_DIR
    run_dir.save_model_atomic(model, tokenizer, target)
    return target
