"""Checks that need no computation, run before the output directory is claimed and before the first forward:
a recipe that cannot work fails in seconds and leaves the output untouched, not after the dense evaluation."""

from __future__ import annotations

from torch import nn

from prune.core.errors import UserInputError
from prune.methods.spec import MethodSpec
from prune.recovery.stage import check_targets
from prune.runs.recipe import Recipe
from prune.tasks.base import Task


def check_recipe(recipe: Recipe, spec: MethodSpec, resume: bool) -> None:
    """What the recipe alone rules out: training settings for a one-shot method, --resume of one that does not
    recover either."""
    if spec.kind == "oneshot" and recipe.train.steps:
        raise UserInputError(
            f"method {spec.name!r} is one-shot; train.steps applies to learnable methods only (recover.steps trains "
            "the kept weights after any method)."
        )
    if resume and spec.kind == "oneshot" and not recipe.recover.steps:
        raise UserInputError(f"method {spec.name!r} is one-shot and has nothing to resume; run without --resume.")


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
