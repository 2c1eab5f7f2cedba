"""Masks saved alone, compactly, like a peft adapter: `masks.safetensors` + `masks.json`.

A mask that is exactly N:M is stored as the index of its candidate pattern per group of M (uint8: 6
candidates for 2:4, so 3 bits' worth per 4 weights instead of 4 floats); any other mask as packed bits.
`masks.json` records the method, its config, and each target's shape and encoding, so a mask file is checked
against the model before a single weight is touched.
"""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from prune.models.blocks import weight_matrix
from prune.core.atomic import write_tensors_with_json
from prune.core.errors import UserInputError
from prune.masks.base import attach_hard_masks, hard_masks

FORMAT_VERSION = 1
TENSORS_FILE = "masks.safetensors"
CONFIG_FILE = "masks.json"


def nm_candidates(n: int, m: int) -> Tensor:
    """All C(M, N) keep-patterns of a group, as a [C, M] bool tensor in lexicographic order."""
    rows = [[j in chosen for j in range(m)] for chosen in combinations(range(m), n)]
    return torch.tensor(rows, dtype=torch.bool)


def encode_nm(keep: Tensor, n: int, m: int) -> Tensor | None:
    """Candidate index per group ([out, in/M] uint8), or None when the mask is not exactly N:M."""
    out_features, in_features = keep.shape
    candidates = nm_candidates(n, m)
    if in_features % m or len(candidates) > 255 or m > 16:
        return None
    groups = keep.reshape(out_features, in_features // m, m)
    if not torch.all(groups.sum(-1) == n):
        return None
    weights = 2 ** torch.arange(m)
    code_to_index = torch.full((2**m,), -1, dtype=torch.long)
    code_to_index[(candidates.long() * weights).sum(-1)] = torch.arange(len(candidates))
    return code_to_index[(groups.long() * weights).sum(-1)].to(torch.uint8)


def decode_nm(index: Tensor, n: int, m: int) -> Tensor:
    candidates = nm_candidates(n, m)
    if index.numel() and int(index.max()) >= len(candidates):
        raise UserInputError(f"mask file holds a candidate index {int(index.max())} beyond the {len(candidates)} of {n}:{m}.")
    return candidates[index.long()].reshape(index.shape[0], -1)


def _encode(keep: Tensor, nm: tuple[int, int] | None) -> tuple[Tensor, dict]:
    if nm is not None and keep.dim() == 2:
        index = encode_nm(keep, *nm)
        if index is not None:
            return index, {"encoding": "nm_index", "n": nm[0], "m": nm[1], "shape": list(keep.shape)}
    packed = torch.from_numpy(np.packbits(keep.cpu().numpy().reshape(-1)))
    return packed, {"encoding": "bits", "shape": list(keep.shape)}


def _decode(tensor: Tensor, info: dict) -> Tensor:
    shape = tuple(info["shape"])
    if info["encoding"] == "nm_index":
        keep = decode_nm(tensor, info["n"], info["m"])
    elif info["encoding"] == "bits":
        count = int(np.prod(shape))
        bits = np.unpackbits(tensor.numpy())
        if bits.size < count:
            raise UserInputError(f"mask file is truncated: {bits.size} bits for a {shape} mask.")
        keep = torch.from_numpy(bits[:count].astype(bool))
    else:
        raise UserInputError(f"mask file uses an unknown encoding {info['encoding']!r}.")
    return keep.reshape(shape)


def save_masks(model: nn.Module, directory: str | Path, meta: dict, nm: tuple[int, int] | None = None) -> None:
    """Write the hard masks of every wrapper in `model` (atomically: temp files, then rename)."""
    write_masks(hard_masks(model), directory, meta, nm)


def write_masks(masks: dict[str, Tensor], directory: str | Path, meta: dict, nm: tuple[int, int] | None = None) -> None:
    """Write {target name: bool mask} (any shape; N:M-encoded where `nm` fits a 2-D mask), atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, targets = {}, {}
    for name, keep in masks.items():
        tensors[name], targets[name] = _encode(keep, nm)
    config = {"format_version": FORMAT_VERSION, **meta, "targets": targets}
    write_tensors_with_json(directory, TENSORS_FILE, tensors, CONFIG_FILE, config)


def read_masks(directory: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read and decode a saved mask set: ({target name: bool mask}, masks.json content)."""
    directory = Path(directory)
    tensors_path, config_path = directory / TENSORS_FILE, directory / CONFIG_FILE
    if not tensors_path.is_file() or not config_path.is_file():
        raise UserInputError(f"{directory} has no {TENSORS_FILE} + {CONFIG_FILE}; pass a run directory of `prune run`.")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(tensors_path)
    except (json.JSONDecodeError, SafetensorError, OSError) as error:
        raise UserInputError(f"mask files in {directory} are corrupt ({error}); rerun `prune run` to recreate them.") from None
    if config.get("format_version") != FORMAT_VERSION or set(tensors) != set(config.get("targets", {})):
        raise UserInputError(f"{config_path} does not describe {tensors_path} (format or target list differ).")
    return {name: _decode(tensors[name], info) for name, info in config["targets"].items()}, config


def load_masks(model: nn.Module, directory: str | Path) -> dict:
    """Wrap `model`'s targets with the saved hard masks, after checking every name and shape."""
    masks, config = read_masks(directory)
    modules = dict(model.named_modules())
    problems = [name for name in masks if name not in modules]
    problems += [
        f"{name} (mask {tuple(keep.shape)}, weight {tuple(weight_matrix(modules[name]).shape)})"
        for name, keep in masks.items()
        if name in modules and tuple(weight_matrix(modules[name]).shape) != tuple(keep.shape)
    ]
    if problems:
        raise UserInputError(
            f"masks in {directory} do not match this model ({config.get('model', '?')} was pruned): "
            f"{', '.join(problems[:5])}. Load them into the model they were made for."
        )
    attach_hard_masks(model, masks)
    return config
