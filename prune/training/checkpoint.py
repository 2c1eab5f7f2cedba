"""Trainer checkpoints without pickle: tensors in safetensors, everything else in JSON, swapped in atomically.

Each checkpoint is a directory `step-<n>/`; the file `latest` names the newest complete one and is replaced
atomically after the directory is fully written, so an interrupted write leaves the previous checkpoint in
force. Older directories are deleted only after `latest` moved on.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prune.core.atomic import staged_directory, write_text_atomic
from prune.core.errors import UserInputError
from prune.training.sharded import copy_into, shard_optimizer_state

POINTER = "latest"


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


def _write_checkpoint(staging: Path, step: int, masks: dict[str, torch.Tensor], optimizer_state: dict, scheduler,
                      extra: dict) -> None:
    save_file(masks, staging / "masks.safetensors")
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer_state)
    optimizer_tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        optimizer_tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(optimizer_tensors, staging / "optimizer.safetensors")
    state = {
        "step": step,
        "optimizer": optimizer_meta,
        "scheduler": scheduler.state_dict(),
        "python_rng": random.getstate(),
        **extra,
    }
    (staging / "trainer_state.json").write_text(json.dumps(state))


def load_checkpoint(directory: Path, trainable: dict[str, nn.Parameter], optimizer, scheduler) -> dict:
    """Restore parameters, optimizer, scheduler and RNG states; returns the trainer state (with `step`). Every
    process reads the whole files and keeps its own shard under FSDP."""
    pointer = directory / POINTER
    if not pointer.is_file():
        raise UserInputError(f"no checkpoint to resume from in {directory}; run without --resume.")
    source = directory / pointer.read_text().strip()
    try:
        params = load_file(source / "masks.safetensors")
        optimizer_tensors = load_file(source / "optimizer.safetensors")
        state = json.loads((source / "trainer_state.json").read_text())
    except (OSError, SafetensorError, json.JSONDecodeError) as error:
        raise UserInputError(f"checkpoint {source} is unreadable ({error}); rerun without --resume.") from None
    if set(params) != set(trainable):
        raise UserInputError(f"checkpoint {source} holds other mask parameters than this model; rerun without --resume.")
    copy_into(trainable, params)
    torch.set_rng_state(optimizer_tensors.pop("rng.torch"))
    cuda_state = optimizer_tensors.pop("rng.cuda", None)
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)
    optimizer.load_state_dict(shard_optimizer_state(_unflatten_optimizer(optimizer_tensors, state["optimizer"]), optimizer))
    scheduler.load_state_dict(state["scheduler"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state
