"""Masks saved alone, compactly, like a peft adapter: `masks.safetensors` + `masks.json`.

A mask that is exactly N:M is stored as the index of its candidate pattern per group of M (uint8: 6
candidates for 2:4, so 3 bits' worth per 4 weights instead of 4 floats); any other mask as packed bits.
`masks.json` records the method, its config, and each target's shape and encoding, so a mask file is checked
against the model before a single weight is touched.
"""

from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from prune.core.atomic import write_tensors_with_json
from prune.core.errors import UserInputError, summarize_names
from prune.core.sparsity import parse_sparsity
from prune.masks.base import attach_hard_masks, hard_masks
from prune.models.blocks import weight_matrix

FORMAT_VERSION = 1
TENSORS_FILE = "masks.safetensors"
CONFIG_FILE = "masks.json"


def nm_candidates(n: int, m: int) -> Tensor:
    """All C(M, N) keep-patterns of a group, as a [C, M] bool tensor in lexicographic order."""
    rows = [[j in chosen for j in range(m)] for chosen in combinations(range(m), n)]
    return torch.tensor(rows, dtype=torch.bool)


def indexable(n: int, m: int) -> bool:
    """Whether N:M masks can be stored as one uint8 candidate index per group. Decided from the count
    C(M, N), never by enumerating the candidates: C(32, 16) is 6e8 patterns, more than memory holds."""
    return m <= 16 and math.comb(m, n) <= 255


def encode_nm(keep: Tensor, n: int, m: int) -> Tensor | None:
    """Candidate index per group ([out, in/M] uint8), or None when the mask is not exactly N:M (or N:M has too
    many candidates for a uint8 index; such masks are stored as bits)."""
    out_features, in_features = keep.shape
    if in_features % m or not indexable(n, m):
        return None
    candidates = nm_candidates(n, m)
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
        raise UserInputError(
            f"the mask file holds a candidate index {int(index.max())}, beyond the {len(candidates)} candidates of "
            f"{n}:{m} (valid: 0-{len(candidates) - 1}): {TENSORS_FILE} is corrupt or was written for another "
            f"pattern. Restore the run's own {TENSORS_FILE}, or rerun `prune run` to recreate it."
        )
    return candidates[index.long()].reshape(index.shape[0], -1)


def _encode(keep: Tensor, nm: tuple[int, int] | None) -> tuple[Tensor, dict]:
    if nm is not None and keep.dim() == 2:
        index = encode_nm(keep, *nm)
        if index is not None:
            return index, {"encoding": "nm_index", "n": nm[0], "m": nm[1], "shape": list(keep.shape)}
    packed = torch.from_numpy(np.packbits(keep.cpu().numpy().reshape(-1)))
    return packed, {"encoding": "bits", "shape": list(keep.shape)}


def _stored_shape(info: dict) -> tuple[int, ...]:
    """The tensor shape masks.json promises for a target (checked before anything is decoded)."""
    shape = info.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(size, int) and size > 0 for size in shape):
        raise ValueError(f"its shape {shape!r} is not a list of positive sizes")
    if info.get("encoding") == "bits":
        return (-(-math.prod(shape) // 8),)
    if info.get("encoding") != "nm_index":
        raise ValueError(f"it uses an unknown encoding {info.get('encoding')!r}")
    n, m = info.get("n"), info.get("m")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m and indexable(n, m)):
        raise ValueError(f"its pattern {n}:{m} cannot be stored as candidate indices")
    if len(shape) != 2 or shape[1] % m:
        raise ValueError(f"a {shape} mask does not split into groups of {m}")
    return (shape[0], shape[1] // m)


def _decode(tensor: Tensor, info: dict, name: str) -> Tensor:
    """Check one stored tensor against its masks.json entry (encoding, pattern, shape, dtype), then decode it."""
    try:
        expected = _stored_shape(info)
    except ValueError as error:
        raise UserInputError(f"{CONFIG_FILE} is inconsistent for {name}: {error}. {_RECREATE}") from None
    if tensor.dtype != torch.uint8 or tuple(tensor.shape) != expected:
        raise UserInputError(
            f"{TENSORS_FILE} and {CONFIG_FILE} do not belong together: {name} is stored as {str(tensor.dtype)} "
            f"{list(tensor.shape)}, but {CONFIG_FILE} describes a {info['shape']} mask encoded as "
            f"{info['encoding']} (uint8 {list(expected)}). {_RECREATE}"
        )
    if info["encoding"] == "nm_index":
        return decode_nm(tensor, info["n"], info["m"]).reshape(info["shape"])
    count = math.prod(info["shape"])
    return torch.from_numpy(np.unpackbits(tensor.numpy())[:count].astype(bool)).reshape(info["shape"])


_RECREATE = (
    f"Copy both files ({TENSORS_FILE} + {CONFIG_FILE}) of one run together, or rerun `prune run` to recreate them."
)


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


def read_mask_config(directory: str | Path) -> dict:
    """masks.json alone (what the masks were made with: model, method, config, targets); {} when absent."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise UserInputError(f"{path} is corrupt ({error}); rerun `prune run` to recreate the mask files.") from None
    if not isinstance(config, dict):
        raise UserInputError(f"{path} is not a MaskPrune mask description (format {FORMAT_VERSION}). {_RECREATE}")
    return config


def read_masks(directory: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read and decode a saved mask set: ({target name: bool mask}, masks.json content). The two files are
    checked against each other (format, targets, encodings, shapes, the N:M pattern of the run's config)
    before anything is decoded."""
    directory = Path(directory)
    tensors_path, config_path = directory / TENSORS_FILE, directory / CONFIG_FILE
    if not tensors_path.is_file() or not config_path.is_file():
        raise UserInputError(f"{directory} has no {TENSORS_FILE} + {CONFIG_FILE}; pass a run directory of `prune run`.")
    config = read_mask_config(directory)
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError) as error:
        raise UserInputError(
            f"mask files in {directory} are corrupt ({error}); rerun `prune run` to recreate them."
        ) from None
    targets = config.get("targets")
    described = isinstance(targets, dict) and all(isinstance(info, dict) for info in targets.values())
    if not described or config.get("format_version") != FORMAT_VERSION:
        raise UserInputError(
            f"{config_path} is not a MaskPrune mask description (format {FORMAT_VERSION}). {_RECREATE}"
        )
    if set(tensors) != set(targets):
        missing, extra = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
        raise UserInputError(
            f"{config_path} lists {len(targets)} targets and {tensors_path} holds {len(tensors)}: "
            + "; ".join(
                filter(
                    None,
                    [
                        f"no tensor for {summarize_names(missing)}" if missing else "",
                        f"tensors not described for {summarize_names(extra)}" if extra else "",
                    ],
                )
            )
            + f". {_RECREATE}"
        )
    _check_pattern(config, targets)
    return {name: _decode(tensors[name], info, name) for name, info in targets.items()}, config


def _check_pattern(config: dict, targets: dict[str, dict]) -> None:
    """Masks stored as N:M candidate indices must use the N:M pattern of the run's config (and a run pruned to
    a fraction stores none)."""
    sparsity = (config.get("config") or {}).get("sparsity")
    try:
        pattern = parse_sparsity(sparsity) if sparsity is not None else None
    except UserInputError:
        pattern = None
    if pattern is None:
        return
    indexed = {
        name: f"{info.get('n')}:{info.get('m')}" for name, info in targets.items() if info.get("encoding") == "nm_index"
    }
    wrong = [name for name, label in indexed.items() if label != str(pattern)]
    if wrong:
        raise UserInputError(
            f"{CONFIG_FILE} says the run pruned to sparsity {pattern}, but stores {summarize_names(wrong)} as "
            f"{indexed[wrong[0]]} masks. {_RECREATE}"
        )


def load_masks(model: nn.Module, directory: str | Path) -> dict:
    """Wrap `model`'s targets with the saved hard masks, after checking every name and shape."""
    masks, config = read_masks(directory)
    modules = dict(model.named_modules())
    missing = [name for name in masks if name not in modules]
    wrong = [
        f"{name} (mask {tuple(keep.shape)}, weight {tuple(weight_matrix(modules[name]).shape)})"
        for name, keep in masks.items()
        if name in modules and tuple(weight_matrix(modules[name]).shape) != tuple(keep.shape)
    ]
    if missing or wrong:
        raise UserInputError(
            f"masks in {directory} do not match this model ({config.get('model', '?')} was pruned): "
            + "; ".join(
                filter(
                    None,
                    [
                        f"no module for {summarize_names(missing)}" if missing else "",
                        f"{len(wrong)} shape(s) differ, e.g. {', '.join(wrong[:3])}" if wrong else "",
                    ],
                )
            )
            + ". Load them into the model they were made for."
        )
    attach_hard_masks(model, masks)
    return config
