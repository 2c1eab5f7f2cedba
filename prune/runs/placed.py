"""The recipe's `runtime:` section applied to a run: checked before anything is written, then the task opened.

`prepare_runtime` applies the thread count, resolves device and dtype, refuses what cannot work (a missing
device, float16 on a CPU, offload with a method that does not prune block by block or a task that cannot stream,
a .bin-only checkpoint to stream), checks the checkpoint's files against its config.json and runs the preflight
memory checks (the weights, then each stage's estimated peak: prune.runs.preflight.check_memory), all before the
run directory is claimed.
`open_task` gives the pipeline the recipe's task holding its model as `runtime.offload` says: loaded and `place`d
(none: on the device; cpu: in RAM, blocks visiting the device through `block_placement`), or under disk the
streamed variant of the task (prune.tasks.streamed), which prunes and measures the checkpoint block by block.
The pipeline runs the same stages on either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import cached_file

from prune.calibration.placement import OnDevice
from prune.core.errors import UserInputError
from prune.methods.registry import METHODS, get_method
from prune.methods.spec import MethodSpec
from prune.models import loading
from prune.models.local import not_a_model_dir
from prune.models.preflight import preflight
from prune.models.runtime import Runtime, apply_threads, resolve_runtime
from prune.models.shards import shard_files
from prune.runs import run_dir
from prune.runs.loading import load_model
from prune.runs.preflight import check_memory, check_model
from prune.runs.recipe import Recipe
from prune.tasks.base import Task
from prune.tasks.registry import get_task
from prune.training.sharded import check_cpu_flag, check_fsdp, fsdp_requested


def local_model_dir(name_or_path: str) -> Path | None:
    """The directory holding the model's config.json, when it is on this machine (alias, directory, run, cache)."""
    candidates = [loading.cache_root() / "models" / name_or_path] if name_or_path in loading.ALIASES else []
    path = Path(name_or_path).expanduser()
    candidates += [path, path / run_dir.MODEL_DIR]
    for candidate in candidates:
        if loading.is_model_dir(candidate):
            return candidate
    if path.exists():  # a directory without config.json (or a file) is no model; loading says so
        return None
    try:
        found = cached_file(name_or_path, "config.json", local_files_only=True)
    except (OSError, ValueError):
        return None
    return Path(found).parent if found is not None else None


def prepare_runtime(recipe: Recipe) -> Runtime:
    """Apply and check `recipe.runtime` (nothing is loaded or written here)."""
    check_cpu_flag()
    apply_threads(recipe.runtime)
    model_dir = local_model_dir(recipe.model)
    runtime = resolve_runtime(recipe.runtime, model_dir / "config.json" if model_dir else None)
    spec = get_method(recipe.method.name)
    if runtime.offload != "none" and not spec.block_by_block:
        placed = ", ".join(name for name in METHODS if get_method(name).block_by_block)
        raise UserInputError(
            f"runtime.offload: {runtime.offload} prunes block by block, which methods {placed} do; "
            f"{recipe.method.name!r} needs the whole model on the device; use runtime.offload: none."
        )
    if runtime.streams:
        get_task(recipe.task, streamed=True)  # refuses a task whose model cannot stream
        if model_dir is None and Path(recipe.model).expanduser().exists():
            raise UserInputError(not_a_model_dir(recipe.model))
        if model_dir is None:
            raise UserInputError(
                f"runtime.offload: disk streams a checkpoint on this machine, and {recipe.model!r} is not one; "
                "download it first (or pass its local directory)."
            )
        shard_files(model_dir)
    check_fsdp(spec.name, spec.fsdp or bool(recipe.recover.steps), runtime.device)  # recovery trains sharded too
    if model_dir is not None and recipe.task == "causal-lm":
        check_memory(recipe, spec, runtime, preflight(model_dir, runtime))
    return runtime


def place(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """offload none: the whole model on the device; cpu: it stays in CPU memory, blocks visit the device.
    Under an FSDP launch it stays in CPU memory too: accelerate puts only each process's shard on the device."""
    return model.to(runtime.device) if runtime.offload == "none" and not fsdp_requested() else model


def block_placement(runtime: Runtime) -> OnDevice | None:
    """Where blocks wait while a method prunes block by block: in RAM under offload: cpu (None: on the device)."""
    return OnDevice(runtime.device) if runtime.offload == "cpu" else None


def open_task(recipe: Recipe, spec: MethodSpec, runtime: Runtime, model_output: Path) -> Task:
    """The recipe's task holding its model as runtime.offload says, the model checked (targets, seq_len, task
    names) before any data is read: loaded and placed, or under offload: disk its skeleton, the checkpoint
    streamed block by block and the pruned one written to `model_output` shard by shard."""
    task = get_task(recipe.task, streamed=runtime.streams)
    if runtime.streams:
        checkpoint = local_model_dir(recipe.model)
        model, processor = task.load_model(str(checkpoint), runtime.dtype)
        check_model(model, recipe, spec, task)
        if spec.streamed_export is not None:
            spec.streamed_export.check(model, recipe.method)
        return task(model, processor, recipe, runtime.device, checkpoint=checkpoint, output=model_output)
    model, processor = load_model(recipe.model, runtime.dtype, task=recipe.task)
    check_model(model, recipe, spec, task)
    return task(place(model, runtime), processor, recipe, runtime.device)
