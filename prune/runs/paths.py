"""The paths a recipe names, checked before torch is imported: `prune run` refuses an output below a file, a model
directory or a data file that is not there at once, not after the seconds that loading torch and transformers
takes. The run directory's other rules (a run of its own, a lock) are prune.runs.run_dir's; what a path holds
(a model's config.json, a text's encoding) is checked where it is read."""

from __future__ import annotations

from pathlib import Path

from prune.core.errors import UserInputError
from prune.data.sources import check_local_source, entry_error
from prune.models.local import check_model_path
from prune.runs.recipe import Recipe
from prune.tasks.data_config import DEFAULT_TASK


def check_output(directory: Path) -> None:
    """The output must be a directory, or a path whose nearest existing ancestor is one."""
    for path in (directory, *directory.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                where = "is a file" if path == directory else f"lies below the file {path}"
                raise UserInputError(f"output {directory} {where}; choose a directory for --output.")
            return


def check_paths(recipe: Recipe) -> None:
    """The output, and for a causal LM the model and every text the run reads (source, mix, measured extra texts)."""
    check_output(Path(recipe.output))
    if recipe.task != DEFAULT_TASK:
        return  # image tasks' models and folders are checked by their loaders
    check_model_path(recipe.model)
    check_local_source(recipe.data.source)
    measured = recipe.eval.extra_texts if recipe.eval.perplexity else []  # only perplexity reads them
    for setting, sources in (("data.mix", recipe.data.mix), ("eval.extra_texts", measured)):
        for source in sources:
            try:
                check_local_source(source)
            except UserInputError as error:
                raise entry_error(setting, source, error) from None
