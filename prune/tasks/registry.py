"""The one list of tasks, by the recipe's `task:` value. A new kind of model is one Task subclass and one entry here."""
from __future__ import annotations

from prune.core.errors import UserInputError
from prune.tasks.base import Task
from prune.tasks.causal_lm import CausalLM
from prune.tasks.image_classification import ImageClassification
from prune.tasks.zero_shot import ZeroShotClassification

TASKS: dict[str, type[Task]] = {task.name: task for task in (CausalLM, ZeroShotClassification, ImageClassification)}
DEFAULT_TASK = CausalLM.name


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise UserInputError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}.")
    return TASKS[name]
