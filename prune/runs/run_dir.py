"""The run directory: claimed at the start, written atomically, never mistaken for a finished run.

A run writes `recipe.yaml` first (marking the directory as a run) and `report.json` last, so a directory
without `report.json` is an unfinished run. Every file goes through a temp name and `os.replace`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from torch import nn

from prune.core.atomic import staged_directory, write_text_atomic
from prune.core.errors import UserInputError

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"
MODEL_DIR = "model"


def claim(directory: str | Path, recipe_dict: dict, *, overwrite: bool, resume: bool = False) -> Path:
    """Create the run directory; refuse one that holds another run (or anything else) unless overwriting.
    An unfinished run of the very same recipe (no report.json) is simply started again; `resume` keeps its
    files (checkpoints) and refuses a changed recipe, naming the changed keys."""
    directory = Path(directory)
    recipe_text = yaml.safe_dump(recipe_dict, sort_keys=False)
    if resume:
        return _resumable(directory, recipe_dict)
    if directory.exists() and any(directory.iterdir()):
        if not (directory / RECIPE_FILE).exists():
            raise UserInputError(f"output {directory} exists and is not a MaskPrune run; choose another --output.")
        unfinished_same_recipe = (
            not (directory / REPORT_FILE).exists() and (directory / RECIPE_FILE).read_text() == recipe_text
        )
        if not overwrite and not unfinished_same_recipe:
            raise UserInputError(
                f"output {directory} already holds a run; pass --overwrite to replace it, or --output DIR."
            )
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(directory / RECIPE_FILE, recipe_text)
    return directory


def save_model_atomic(model: nn.Module, tokenizer, directory: Path) -> None:
    """save_pretrained into a staging dir, then swap it in: model/ is whole or absent."""
    with staged_directory(directory) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def _resumable(directory: Path, recipe_dict: dict) -> Path:
    require_run(directory)
    if (directory / REPORT_FILE).exists():
        raise UserInputError(f"{directory} holds a finished run; nothing to resume (use --overwrite to redo it).")
    saved = yaml.safe_load((directory / RECIPE_FILE).read_text())
    changed = sorted(set(_flatten(saved).items()) ^ set(_flatten(recipe_dict).items()))
    if changed:
        keys = sorted({key for key, _ in changed})
        raise UserInputError(
            f"cannot resume {directory}: the recipe changed ({', '.join(keys)}). Resume with the same recipe, "
            "or start over with --overwrite."
        )
    return directory


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = repr(value)
    return flat


def require_run(directory: str | Path) -> Path:
    directory = Path(directory)
    if not (directory / RECIPE_FILE).is_file():
        raise UserInputError(f"{directory} is not a run directory (no {RECIPE_FILE}); pass a `prune run` output.")
    return directory

