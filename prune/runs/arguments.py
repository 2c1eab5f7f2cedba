"""The Python API's argument checks: a wrong argument is a UserInputError that names it and says what to pass,
never an AttributeError or TypeError from deep inside a forward pass.

A recipe is checked by its schema before `prune run` computes anything; these checks are the same promise for
arguments handed to `prune.attach`, `prune.export`, `prune.oneshot`, `prune.recover` and the other public functions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from prune.core.config import MethodConfig, validated
from prune.core.errors import UserInputError, described
from prune.masks.base import wrappers
from prune.models.blocks import LINEAR_TYPES, weight_matrix
from prune.models.loading import max_positions
from prune.recovery.config import RecoverConfig


def check_model(model, argument: str = "model") -> nn.Module:
    """A model object (a string is a name to load first)."""
    if isinstance(model, (str, Path)):
        raise UserInputError(
            f"{argument} is the name {str(model)!r}, not a model; load it first with "
            f"`model, tokenizer = prune.load_model({str(model)!r})` (prune.oneshot also takes a name)."
        )
    if not isinstance(model, nn.Module):
        raise UserInputError(
            f"{argument} must be a torch model (e.g. from prune.load_model or AutoModelForCausalLM.from_pretrained), "
            f"got {described(model)}."
        )
    return model


def check_config(config, argument: str = "config") -> MethodConfig:
    """A method config built by `prune.method_config` (a dict or a name is turned into one there)."""
    if isinstance(config, dict):
        raise UserInputError(
            f"{argument} is a dict; build the method config from it with `prune.method_config(**{argument})` "
            "(the same keys as a recipe's method section, e.g. {'name': 'wanda', 'sparsity': '2:4'})."
        )
    if isinstance(config, str):
        raise UserInputError(
            f"{argument} is the string {config!r}; pass `prune.method_config({config!r}, sparsity=...)` instead."
        )
    if not isinstance(config, MethodConfig):
        raise UserInputError(
            f"{argument} must be a method config from prune.method_config(...), got {described(config)}."
        )
    return config


def check_unmasked(model: nn.Module, argument: str = "model") -> None:
    """Masks go on a model that has none: a second attach would wrap the wrappers."""
    masked = list(wrappers(model))
    if masked:
        raise UserInputError(
            f"{argument} already carries MaskPrune's masks on {len(masked)} modules (e.g. {masked[0]}); attach to a "
            "fresh model, or merge these first with prune.export(model)."
        )


def check_masked(model: nn.Module, argument: str = "model") -> None:
    """Exporting or saving masks needs masks: without them the result would be the dense model, silently."""
    if not wrappers(model):
        raise UserInputError(
            f"{argument} carries no MaskPrune masks, so there is nothing to merge or save; call "
            "prune.attach(model, config, ...) (or prune.load_masks(model, directory)) first."
        )


def check_recover_config(config, argument: str = "config") -> RecoverConfig:
    """A recipe's `recover` keys (a dict) or a RecoverConfig, with steps to train."""
    if isinstance(config, dict):
        config = validated(RecoverConfig, config, "recover")
    elif not isinstance(config, RecoverConfig):
        raise UserInputError(
            f"{argument} must be a dict of a recipe's recover keys (e.g. {{'steps': 200, 'mode': 'lora'}}) or a "
            f"prune.recovery.config.RecoverConfig, got {described(config)}."
        )
    if not config.steps:
        raise UserInputError(
            f"{argument} has steps: 0, so recovery would train nothing; give its optimizer steps, e.g. "
            "{'steps': 200}."
        )
    return config


def check_masks(masks, model: nn.Module, argument: str = "masks") -> dict[str, Tensor]:
    """The masks of a merged model, for recovery: {linear module name: bool keep tensor [out, in]}, only for a
    model that carries none of its own."""
    masked = list(wrappers(model))
    if masked:
        raise UserInputError(
            f"{argument} are for a plain model whose masks were merged, but model carries its own on "
            f"{len(masked)} modules (e.g. {masked[0]}); leave {argument} out."
        )
    if not isinstance(masks, dict) or not masks:
        raise UserInputError(
            f"{argument} must be a non-empty dict {{module name: keep}} of bool tensors [out, in] (e.g. "
            f"{{name: module.weight != 0}}), got {described(masks)}."
        )
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        if not isinstance(modules.get(name), LINEAR_TYPES):
            raise UserInputError(
                f"{argument} names {name!r}, which is no linear layer of the model; use the names of "
                "model.named_modules() (e.g. 'model.layers.0.mlp.up_proj')."
            )
        shape = list(weight_matrix(modules[name]).shape)
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or list(keep.shape) != shape:
            got = f"a {keep.dtype} tensor of shape {list(keep.shape)}" if isinstance(keep, Tensor) else described(keep)
            raise UserInputError(
                f"{argument}[{name!r}] must be a bool tensor of the layer's weight shape {shape} ([out, in]; "
                f"True where a weight is kept), got {got}."
            )
    return masks


def check_blocks(blocks, model: nn.Module, argument: str) -> Tensor:
    """Token blocks [samples, seq_len] of integer ids the model can embed, no longer than its positions."""
    if not isinstance(blocks, Tensor):
        raise UserInputError(
            f"{argument} must be token blocks, a 2-D integer tensor [samples, seq_len], got {described(blocks)}; "
            "turn text into blocks with prune.calibration_blocks(tokenizer, texts, samples, seq_len)."
        )
    if blocks.dtype.is_floating_point or blocks.dtype.is_complex or blocks.dtype == torch.bool:
        raise UserInputError(
            f"{argument} holds {blocks.dtype} values; token ids are integers: pass a torch.long tensor "
            "(e.g. from prune.calibration_blocks, or blocks.long() if the values are whole numbers)."
        )
    if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 1:
        raise UserInputError(
            f"{argument} has shape {list(blocks.shape)}; token blocks are [samples, seq_len] with at least one "
            "sample (one text: blocks.reshape(1, -1))."
        )
    vocab = _vocab_size(model)
    low, high = int(blocks.min()), int(blocks.max())
    if low < 0 or (vocab is not None and high >= vocab):
        embeds = f"ids 0 to {vocab - 1}" if vocab is not None else "no negative id"
        raise UserInputError(
            f"{argument} holds token ids from {low} to {high}, but the model embeds {embeds}; tokenize with the "
            "model's own tokenizer."
        )
    limit = max_positions(model) if hasattr(model, "config") else None
    if isinstance(limit, int) and blocks.shape[1] > limit:
        raise UserInputError(
            f"{argument} blocks are {blocks.shape[1]} tokens long, more than the {limit} positions the model was "
            f"built for (max_position_embeddings in its config); use seq_len <= {limit}."
        )
    return blocks.long()


def check_rows(data, model: nn.Module, argument: str = "data"):
    """Training rows: token blocks, checked as such (another task's rows, e.g. CLIP's dataset, pass as they are);
    text is refused, since it needs tokenizing first."""
    if isinstance(data, Tensor):
        return check_blocks(data, model, argument)
    if isinstance(data, str) or (isinstance(data, (list, tuple)) and data and isinstance(data[0], str)):
        raise UserInputError(
            f"{argument} is text; training reads token blocks [samples, seq_len]: turn text into blocks with "
            "prune.calibration_blocks(tokenizer, texts, samples, seq_len)."
        )
    return data


def _vocab_size(model: nn.Module) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)
