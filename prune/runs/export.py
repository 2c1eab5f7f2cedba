"""Rebuild a run's `model/` from the base model and its saved masks, through the method's own load and export
hooks (weight masks: merged into the weights; structural methods: the smaller model).

Nothing is written until the run's files agree: masks.json with masks.safetensors (prune.masks.storage, in the
method's load), both with recipe.yaml (model, method settings), and the masks with the modules the recipe
targets on the base model."""

from __future__ import annotations

from pathlib import Path

from prune.core.atomic import save_pretrained_atomic
from prune.core.errors import UserInputError, summarize_names
from prune.masks.storage import CONFIG_FILE, TENSORS_FILE, read_mask_config
from prune.methods.registry import get_method
from prune.runs import run_dir
from prune.runs.loading import load_model
from prune.runs.provenance import mark_pruned
from prune.runs.recipe import Recipe, parse_recipe


def export_run(directory: str | Path) -> Path:
    """Write `<run>/model/`, loadable by plain `AutoModelForCausalLM.from_pretrained` (or the task's class).
    The run is locked meanwhile: a `prune run` writing it refuses to start, and an export refuses a live run."""
    directory = run_dir.require_run(directory)
    run_dir.lock(directory)
    try:
        return _export(directory)
    finally:
        run_dir.release(directory)


def _export(directory: Path) -> Path:
    raw = run_dir.read_recipe(directory)
    method = raw["method"].get("name") if isinstance(raw.get("method"), dict) else None
    if isinstance(method, str) and get_method(method).restore is not None:
        raise UserInputError(
            f"{directory} was pruned by {method}, whose model chooses what to compute per input and so "
            "has no plain-checkpoint form; the run directory itself holds it: load it with "
            f"prune.load_model({str(directory)!r}) (base model + the saved predictors)."
        )
    try:
        recipe = parse_recipe(raw)
    except UserInputError as error:
        raise UserInputError(f"{directory / run_dir.RECIPE_FILE}: {error}") from None
    if not (directory / CONFIG_FILE).is_file() or not (directory / TENSORS_FILE).is_file():
        raise UserInputError(f"cannot export {directory}: {_why_no_masks(directory, recipe)}")
    saved = read_mask_config(directory)
    _check_same_run(directory, saved, recipe)
    if recipe.recover.steps:
        raise UserInputError(
            f"{directory} trained the kept weights after pruning (recover.steps), which the masks alone cannot "
            "rebuild; its model/ was written by `prune run` (rerun with export.save_model: true if it is missing)."
        )
    if recipe.method.changes_weights:
        raise UserInputError(
            f"{directory} was pruned by {recipe.method.name} with weight updates, which the masks alone cannot "
            "rebuild; its model/ was written by `prune run` (rerun with export.save_model: true if it is missing)."
        )
    spec = get_method(recipe.method.name)
    model, tokenizer = load_model(recipe.model, task=recipe.task)  # a CLIP run: the model and its processor
    _check_targets(directory, model, recipe, set(saved.get("targets") or {}))
    spec.load(model, directory, recipe.method)
    model_dir = directory / run_dir.MODEL_DIR
    exported = spec.export(model, recipe.method)
    mark_pruned(exported, recipe.method)
    save_pretrained_atomic(model_dir, exported, tokenizer)
    return model_dir


def _why_no_masks(directory: Path, recipe: Recipe) -> str:
    """Why a run directory holds no mask files to export from, and what to do instead."""
    missing = f"it holds no {TENSORS_FILE} + {CONFIG_FILE}"
    if not (directory / run_dir.REPORT_FILE).is_file():
        return (
            f"{missing} because the run is unfinished (no {run_dir.REPORT_FILE}): masks are written when it ends. "
            f"Finish it (`prune run RECIPE --output {directory} --resume` for a learnable method that checkpointed) "
            "or rerun it."
        )
    if recipe.runtime.offload == "disk":
        return (
            f"{missing} because it ran under runtime.offload: disk, which writes the pruned weights straight into "
            f"{run_dir.MODEL_DIR}/ and no masks; that {run_dir.MODEL_DIR}/ is the export (rerun the recipe if it is "
            "gone)."
        )
    return f"{missing} (they were removed); rerun `prune run` with its recipe.yaml to recreate them."


def _check_same_run(directory: Path, meta: dict, recipe: Recipe) -> None:
    """masks.json records the model and method section its masks were made with; recipe.yaml must agree."""
    saved = {"model": meta.get("model"), **(meta.get("config") or {})}
    wanted = {"model": recipe.model, **recipe.to_dict()["method"]}
    differ = [key for key in wanted if key in saved and saved[key] != wanted[key]]
    if differ:
        shown = "; ".join(
            f"{key}: {saved[key]!r} in {CONFIG_FILE}, {wanted[key]!r} in {run_dir.RECIPE_FILE}" for key in differ[:3]
        )
        raise UserInputError(
            f"the masks in {directory} were not made by the run its {run_dir.RECIPE_FILE} describes ({shown}). "
            f"Keep the mask files and {run_dir.RECIPE_FILE} of one run together, or rerun `prune run`."
        )


def _check_targets(directory: Path, model, recipe: Recipe, saved: set[str]) -> None:
    """The masks cover exactly the modules the recipe targets on this model (none missing, none extra)."""
    spec = get_method(recipe.method.name)
    if spec.targets is None:
        return
    wanted = set(spec.targets(model, recipe.method))
    missing, extra = sorted(wanted - saved), sorted(saved - wanted)
    if missing or extra:
        details = "; ".join(
            filter(
                None,
                [
                    f"no mask for {summarize_names(missing)}" if missing else "",
                    f"masks for modules it does not target: {summarize_names(extra)}" if extra else "",
                ],
            )
        )
        raise UserInputError(
            f"the masks in {directory} ({len(saved)}) do not cover the {len(wanted)} modules its "
            f"{run_dir.RECIPE_FILE} targets: {details}. Keep the mask files and {run_dir.RECIPE_FILE} of one run "
            "together, or rerun `prune run`."
        )
