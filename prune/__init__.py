"""MaskPrune: learnable masks that prune Hugging Face models while their weights stay frozen.

The Python API, peft-style: what `prune run` does with a recipe, one call at a time, on any HF model.

    import prune, torch

    model, tokenizer = prune.load_model("smollm2-135m")              # or any causal LM you loaded yourself
    config = prune.method_config("nm_gumbel", sparsity="2:4", prior="magnitude")
    objective = prune.attach(model, config)                          # None for one-shot methods
    optimizer = torch.optim.AdamW(prune.mask_parameters(model) + objective.extra_parameters(), lr=1e-2)
    model.train()                                                    # soft masks; the weights stay frozen
    for step, batch in enumerate(batches):
        objective.begin_step(step, len(batches))
        loss = model(input_ids=batch, labels=batch).loss + objective.regularizer(model)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    model.eval()                                                     # hard masks
    prune.save_masks(model, "masks/", config)                        # the masks only, a few KB
    prune.load_masks(fresh_model, "masks/", config)                  # identical logits
    plain = prune.export(model, config)                              # a plain transformers model

`prune.train(model, objective, blocks, prune.TrainConfig(steps=...), run_dir)` is the one trainer instead of
your own loop (checkpoints, resume, logging, accelerate).
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from prune.core.errors import UserInputError
from prune.methods.registry import get_declaration, get_method

if TYPE_CHECKING:
    from torch import Tensor, nn

    from prune.core.config import MethodConfig
    from prune.masks.base import Objective

# The public names defined elsewhere, each with the module it is imported from on first use (PEP 562, as
# transformers does): `import prune` and the CLI's start stay free of torch and transformers, so a bad recipe is
# refused at once. A new public name is one line here.
_EXPORTS: dict[str, str] = {
    "load_model": "prune.runs.loading",
    "mask_parameters": "prune.masks.base",
    "train": "prune.training.trainer",
    "TrainConfig": "prune.training.config",
    "METHODS": "prune.methods.registry",
    "MethodConfig": "prune.core.config",
    "Objective": "prune.masks.base",
    "UserInputError": "prune.core.errors",
    "MagnitudeConfig": "prune.methods.oneshot.config",
    "WandaConfig": "prune.methods.oneshot.config",
    "SparseGPTConfig": "prune.methods.oneshot.config",
    "StructuredConfig": "prune.methods.structured.config",
    "NMGumbelConfig": "prune.methods.nm_gumbel.config",
    "VIBConfig": "prune.methods.vib.config",
    "BinaryConfig": "prune.methods.binary.config",
    "GatingConfig": "prune.methods.gating.config",
}
__all__ = ["method_config", "attach", "save_masks", "load_masks", "export", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """A public name of `_EXPORTS`, imported from its module the first time it is read (then kept here)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prune' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def method_config(name: str, **fields) -> MethodConfig:
    """The validated config of a registered method, e.g. `method_config("wanda", sparsity="2:4")`: the same
    keys as a recipe's `method` section. A bad or unknown key is a UserInputError naming it."""
    config_class = get_declaration(name).config_class
    try:
        return config_class.model_validate({"name": name, **fields})
    except ValidationError as error:
        allowed = ", ".join(config_class.model_fields)
        problems = "; ".join(_problem(item, allowed) for item in error.errors())
        raise UserInputError(f"invalid {name} config: {problems}") from None


def _problem(item: dict, allowed: str) -> str:
    """One validation error, worded like a recipe's: the key, then what is wrong with it."""
    where, message = ".".join(map(str, item["loc"])), item["msg"].removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        return f"unknown key {where!r}; allowed keys: {allowed}"
    return f"{where}: {message}" if where else message


def attach(model: nn.Module, config: MethodConfig, calibration: Tensor | None = None) -> Objective | None:
    """Wrap `model`'s targets with the method's masks, in place; the weights stay untouched.

    One-shot methods decide their masks here and return None; wanda, sparsegpt (and structured's activation
    score, nm_gumbel's wanda/sparsegpt priors) read `calibration`, token blocks [samples, seq_len]. Learnable
    methods return the Objective to train with, and leave only the mask parameters (and the objective's
    `extra_parameters()`) requiring grad, so a hand-written loop cannot move a weight by accident."""
    from prune.training.trainer import trainable_parameters  # imports torch: on first use, like _EXPORTS

    objective = get_method(config.name).attach(model, config, calibration)
    if objective is not None:
        trainable_parameters(model, objective)
    return objective


def save_masks(model: nn.Module, directory: str | Path, config: MethodConfig) -> Path:
    """Write the masks of a model `attach`ed with `config` (not the model) into `directory`, in the files a
    `prune run` directory holds: masks.safetensors + masks.json (gating: predictors.safetensors + gating.json)."""
    from prune.methods.spec import masks_meta  # imports torch: on first use, like _EXPORTS

    directory = Path(directory)
    name = getattr(getattr(model, "config", None), "name_or_path", None) or "?"
    get_method(config.name).save(model, directory, config, masks_meta(name, config))
    return directory


def load_masks(model: nn.Module, directory: str | Path, config: MethodConfig) -> nn.Module:
    """Put masks saved by `save_masks` (or a `prune run` directory's) back on the base model they were made
    for, as fixed masks: the pruned model again, with identical logits. Names and shapes are checked first."""
    return get_method(config.name).load(model, Path(directory), config)


def export(model: nn.Module, config: MethodConfig) -> nn.Module:
    """The pruned model as a plain transformers model (hard masks merged into the weights; structural
    methods: the physically smaller model), ready for `save_pretrained`. Gating has no such form (its masks
    depend on each input) and raises UserInputError; keep its masks with `save_masks` instead."""
    return get_method(config.name).export(model, config)
