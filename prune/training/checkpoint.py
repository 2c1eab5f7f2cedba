"""Trainer checkpoints without pickle: tensors in safetensors, everything else in JSON, swapped in atomically.

Each checkpoint is a directory `step-<n>/`; the file `latest` names the newest complete one and is replaced
atomically after the directory is fully written, so an interrupted write leaves the previous checkpoint in
force. Older directories are deleted only after `latest` moved on. A checkpoint holds everything the next step
depends on: parameters, optimizer and scheduler state, the step (which fixes the data order) and the state of
every random generator (prune.core.rng). Loading checks every tensor against what it is loaded into
(prune.core.tensor_fit) and the trainer state's types before anything is restored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from prune.core import rng
from prune.core.atomic import save_safetensors, staged_directory, write_text_atomic
from prune.core.errors import UserInputError
from prune.core.tensor_fit import check_fit
from prune.training.sharded import copy_into, shard_optimizer_state

POINTER = "latest"
START_OVER = "Start the run over with --overwrite instead of --resume."


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path, step: int, masks: dict[str, torch.Tensor], optimizer_state: dict, scheduler, extra: dict
) -> Path:
    """Write `directory/step-<step>/` and point `latest` at it; returns the checkpoint directory. `masks` and
    `optimizer_state` are whole (gathered from every shard under FSDP), so the files are those of one process."""
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = directory / f"step-{step}"
    with staged_directory(checkpoint) as staging:
        _write_checkpoint(staging, step, masks, optimizer_state, scheduler, extra)
    write_text_atomic(directory / POINTER, checkpoint.name)
    for old in directory.glob("step-*"):
        if old != checkpoint:
            shutil.rmtree(old, ignore_errors=True)
    return checkpoint


def _write_checkpoint(
    staging: Path, step: int, masks: dict[str, torch.Tensor], optimizer_state: dict, scheduler, extra: dict
) -> None:
    save_safetensors(masks, staging / "masks.safetensors")
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer_state)
    rng_tensors, python_rng = rng.to_checkpoint(rng.capture())
    save_safetensors({**optimizer_tensors, **rng_tensors}, staging / "optimizer.safetensors")
    state = {
        "step": step,
        "optimizer": optimizer_meta,
        "scheduler": scheduler.state_dict(),
        "python_rng": python_rng,
        **extra,
    }
    (staging / "trainer_state.json").write_text(json.dumps(state))


def load_checkpoint(directory: Path, trainable: dict[str, nn.Parameter], optimizer, scheduler) -> dict:
    """Restore parameters, optimizer, scheduler and RNG states; returns the trainer state (with `step`). Every
    process reads the whole files and keeps its own shard under FSDP (a shard's shape is its whole tensor's)."""
    source, params, optimizer_tensors, state = _read(directory)
    check_fit(params, trainable, f"checkpoint {source / 'masks.safetensors'}", START_OVER)
    layout = {**_optimizer_layout(optimizer, optimizer_tensors), **rng.checkpoint_layout(optimizer_tensors)}
    check_fit(optimizer_tensors, layout, f"checkpoint {source / 'optimizer.safetensors'}", START_OVER)
    try:
        random_state = rng.from_checkpoint(optimizer_tensors, state["python_rng"])
        moments = {name: tensor for name, tensor in optimizer_tensors.items() if name.startswith("state.")}
        optimizer.load_state_dict(shard_optimizer_state(_unflatten_optimizer(moments, state["optimizer"]), optimizer))
        scheduler.load_state_dict(state["scheduler"])
        rng.restore(random_state)
    except (KeyError, TypeError, ValueError) as error:
        raise UserInputError(
            f"checkpoint {source} is malformed ({type(error).__name__}: {error}). {START_OVER}"
        ) from None
    copy_into(trainable, params)
    return state


def check_resumable(directory: Path, steps: int, section: str = "train") -> int:
    """What --resume would continue from, checked before the run directory is claimed: the checkpoint `latest`
    names is readable, its step agrees with its directory's name and lies within the `steps` of the training
    stage's recipe section (train, recover), and every value in it is finite (resuming from a NaN would carry it
    into what the run trains). Returns its step."""
    source, params, optimizer_tensors, state = _read(directory)
    step = state["step"]
    if source.name != f"step-{step}":
        raise UserInputError(
            f"{source / 'trainer_state.json'} says step {step}, but its directory is {source.name}: the checkpoint "
            f"was altered or mixed with another. {START_OVER}"
        )
    if step > steps:
        raise UserInputError(
            f"checkpoint {source} is at step {step}, beyond the recipe's {section}.steps ({steps}): it was not written "
            f"by this recipe's run. {START_OVER}"
        )
    for name, tensor in {**params, **optimizer_tensors}.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserInputError(
                f"checkpoint {source} holds non-finite values ({name} has NaN or inf); resuming would carry them "
                f"into the run's masks. {START_OVER}"
            )
    return step


def _read(directory: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(checkpoint directory, masks, optimizer and RNG tensors, trainer state) of the checkpoint `latest` names,
    its step a whole number >= 0."""
    pointer = directory / POINTER
    if not pointer.is_file():
        raise UserInputError(f"no checkpoint to resume from in {directory}; run without --resume.")
    source = directory / pointer.read_text().strip()
    try:
        params = load_file(source / "masks.safetensors")
        optimizer_tensors = load_file(source / "optimizer.safetensors")
        state = json.loads((source / "trainer_state.json").read_text())
    except (OSError, SafetensorError, ValueError) as error:  # ValueError: JSON or UTF-8 that is not
        raise UserInputError(f"checkpoint {source} is unreadable ({error}). {START_OVER}") from None
    step = state.get("step") if isinstance(state, dict) else None
    if type(step) is not int or step < 0:  # bool is an int subclass, and no step count
        raise UserInputError(
            f"{source / 'trainer_state.json'}: step must be a whole number >= 0, found {step!r}. {START_OVER}"
        )
    return source, params, optimizer_tensors, state


def _optimizer_layout(optimizer, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What each saved AdamW state tensor `state.<index>.<key>` must look like: `step` a scalar, the moments like
    their parameter. Only saved names are listed (a parameter without a gradient yet has no state); a name that
    points at no parameter is left out, so that it is reported."""
    ordered = [param for group in optimizer.param_groups for param in group["params"]]
    layout = {}
    for name in saved:
        kind, index, key = (name.split(".", 2) + ["", ""])[:3]
        if kind == "state" and index.isdigit() and int(index) < len(ordered) and key:
            param = ordered[int(index)]
            layout[name] = torch.empty((), dtype=saved[name].dtype) if key == "step" else param
    return layout


def load_params(path: Path, trainable: dict[str, nn.Parameter], fix: str) -> None:
    """Load saved parameters (e.g. the best masks) into `trainable`, after checking every name, shape and dtype."""
    try:
        saved = load_file(path)
    except (OSError, SafetensorError) as error:
        raise UserInputError(f"{path} is unreadable ({error}). {fix}") from None
    check_fit(saved, trainable, str(path), fix)
    copy_into(trainable, saved)
