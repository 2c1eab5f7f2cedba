"""The paths a recipe (or `prune eval`) names, checked before torch is imported: `prune run` refuses an output below
a file, a model directory or a data file that is not there at once, not after the seconds that loading torch and
transformers takes. The run directory's other rules (a run of its own, a lock) are prune.runs.run_dir's; what a
path holds (a model's config.json, a text's encoding) is checked where it is read.

`prune eval` writes two files, eval.json (last) and eval.md, into `eval_output`: --output, else beside the model.
eval.json carries `written_by: prune eval`, so a later `prune eval` knows the pair is its own and replaces it; a
file of those names that MaskPrune did not write is never replaced."""

from __future__ import annotations

import json
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


EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
EVAL_STAMP = "prune eval"  # eval.json's `written_by`


def eval_output(model: str, output: str | None) -> Path:
    """Where `prune eval` writes: `output`; else beside the model: into the directory given (a run directory, beside
    its model/, or a model directory); else, for an alias or a Hub id, runs/eval/<name>."""
    if output:
        return Path(output)
    path = Path(model).expanduser()
    return path if path.is_dir() else Path("runs") / "eval" / model.replace("/", "_")


def check_eval_output(directory: Path) -> None:
    """The output is (or can become) a directory, and eval.json / eval.md there are absent or `prune eval`'s own."""
    check_output(directory)
    ours = _is_own_eval(directory / EVAL_JSON)
    for name in (EVAL_JSON, EVAL_MD):
        path = directory / name
        if (path.exists() or path.is_symlink()) and not ours:
            raise UserInputError(
                f"{path} exists and was not written by `prune eval` (no {EVAL_JSON} of its own beside it); MaskPrune "
                "never replaces a file it did not write. Move that file away, or pass another --output."
            )


def _is_own_eval(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("written_by") == EVAL_STAMP
