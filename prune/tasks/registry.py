"""The one list of tasks, by the recipe's `task:` value. A new kind of model is one Task subclass, one entry here and
its `data` section in prune.tasks.data_config.DATA_CONFIGS (torch-free: the recipe validates it before torch is
imported); a task whose model can stream from disk (runtime.offload: disk) has its streamed variant in STREAMED."""

from __future__ import annotations

from prune.core.errors import UserInputError
from prune.tasks.base import Task
from prune.tasks.causal_lm import CausalLM
from prune.tasks.image_classification import ImageClassification
from prune.tasks.streamed import StreamedCausalLM
from prune.tasks.zero_shot import ZeroShotClassification

TASKS: dict[str, type[Task]] = {task.name: task for task in (CausalLM, ZeroShotClassification, ImageClassification)}
STREAMED: dict[str, type[Task]] = {StreamedCausalLM.name: StreamedCausalLM}


def get_task(name: str, *, streamed: bool = False) -> type[Task]:
    """The task class of `task: name`; `streamed`: its variant that holds the model on disk (runtime.offload: disk)."""
    if name not in TASKS:
        raise UserInputError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}.")
    if streamed and name not in STREAMED:
        raise UserInputError(
            f"runtime.offload: disk streams {', '.join(STREAMED)} models from their shards; task {name!r} needs its "
            "model in memory: use runtime.offload: cpu or none."
        )
    return STREAMED[name] if streamed else TASKS[name]
