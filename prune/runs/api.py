"""The Python API one step at a time (re-exported by `prune`): what `prune run` does with a recipe, on any model.

Each function checks its arguments before it touches the model (prune.runs.arguments), so a wrong one is a
UserInputError naming it. The model remembers the config its masks were made with (`attach`, `load_masks`), so
`save_masks` and `export` need no second copy of it and refuse one that differs; while the masks are attached,
its `save_pretrained` refuses (prune.masks.base.guard_save) rather than write a checkpoint that from_pretrained
would load with its pruned layers re-initialised at random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.utils import CONFIG_NAME

from prune.core.atomic import save_pretrained_atomic
from prune.core.config import MethodConfig
from prune.core.errors import UserInputError, described
from prune.masks import base
from prune.masks.base import Objective, guard_save, release_save, wrappers
from prune.masks.storage import CONFIG_FILE, read_mask_config
from prune.masks.targets import select_targets
from prune.methods.registry import METHODS, get_method, method_config, saved_file_pairs
from prune.methods.spec import masks_meta
from prune.models.blocks import weight_matrix
from prune.models.loading import is_model_dir, load_states
from prune.recovery import stage
from prune.recovery.config import RecoverConfig
from prune.runs import loading
from prune.runs.arguments import (
    check_blocks,
    check_config,
    check_masked,
    check_masks,
    check_model,
    check_recover_config,
    check_rows,
    check_unmasked,
)
from prune.runs.provenance import RECORD_KEY, mark_pruned
from prune.runs.run_dir import MODEL_DIR
from prune.tasks.data_config import DEFAULT_TASK
from prune.training import trainer
from prune.training.config import TrainConfig
from prune.training.trainer import TrainResult, trainable_parameters

ATTACHED = "maskprune_config"  # the model attribute holding the config its masks were made with
# what save_masks writes beside the tensors, naming the method and its config
SAVED_DESCRIPTIONS = (CONFIG_FILE, *(description for _, description in saved_file_pairs()))


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, *, task: str = DEFAULT_TASK):
    """(model in eval mode, tokenizer or processor) for an embedded alias, a model directory, a Hub id or a
    `prune run` directory (its model/, or a gated model rebuilt from the base model and its predictors)."""
    if not isinstance(name_or_path, (str, Path)):
        raise UserInputError(
            "name_or_path must name a model (an alias such as 'smollm2-135m', a directory or a Hub id), got "
            f"{described(name_or_path)}."
        )
    if not isinstance(dtype, torch.dtype):
        raise UserInputError(f"dtype must be a torch.dtype such as torch.bfloat16, got {described(dtype)}.")
    model, processor = loading.load_model(str(name_or_path), dtype, task=task)
    if wrappers(model):  # a gated run: the model carries its predictors
        guard_save(model)
    return model, processor


def attach(
    model: nn.Module, config: MethodConfig, calibration: Tensor | None = None, selection: Tensor | None = None
) -> Objective | None:
    """Wrap `model`'s targets with the method's masks, in place; the weights stay untouched.

    One-shot methods decide their masks here and return None; wanda, sparsegpt (and structured's activation
    score, nm_gumbel's wanda/sparsegpt priors, depth's block importance) read `calibration`, token blocks
    [samples, seq_len] (from text: prune.calibration_blocks); depth chooses its blocks on `selection`, validation
    blocks. Learnable methods return the Objective to train with, and leave only the mask
    parameters (and the objective's `extra_parameters()`) requiring grad, so a hand-written loop cannot move a
    weight by accident. Until `export`, the model's save_pretrained refuses."""
    check_model(model)
    check_config(config)
    check_unmasked(model)
    if calibration is not None:
        calibration = check_blocks(calibration, model, "calibration")
    spec = get_method(config.name)
    if selection is not None:
        selection = check_blocks(selection, model, "selection")
    options = {"selection": selection} if spec.needs_selection else {}
    objective = spec.attach(model, config, calibration, **options)
    if objective is not None:
        trainable_parameters(model, objective)
    _remember(model, config)
    return objective


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every mask in `model`: what a hand-written loop's optimizer takes."""
    return base.mask_parameters(check_model(model))


def save_masks(model: nn.Module, directory: str | Path, config: MethodConfig | None = None) -> Path:
    """Write the masks of an `attach`ed model (not the model) into `directory`, in the files a `prune run`
    directory holds: masks.safetensors + masks.json (gating: predictors.safetensors + gating.json; activation:
    thresholds.safetensors + thresholds.json). `config`: the one it was attached with (the default), or an error.

    After `recover` under input masks (activation sparsity: the weights trained with the thresholds fixed), the
    thresholds alone would rebuild the model as it was before recovery, so the recovered weights are written too,
    into `directory`/model/ as a plain checkpoint (as a `prune run` directory holds them); `load_masks` puts both
    back."""
    check_model(model)
    config = _config_of(model, config)
    check_masked(model)
    directory = _directory(directory)
    name = getattr(getattr(model, "config", None), "name_or_path", None) or "?"
    recovered = _recovered_mode(model)
    get_method(config.name).save(model, directory, config, masks_meta(name, config, recovered=recovered is not None))
    if recovered is not None:
        with base.unwrapped(model):
            save_pretrained_atomic(directory / MODEL_DIR, model, None)
    return directory


def load_masks(model: nn.Module, directory: str | Path, config: MethodConfig | None = None) -> nn.Module:
    """Put masks saved by `save_masks` (or a `prune run` directory's) back on the base model they were made
    for, as fixed masks: the pruned model again, with identical logits. The config is read from the saved files
    (masks.json); a `config` passed as well must be that one. Names and shapes are checked first. Input masks
    saved after recovery come with their recovered weights (`directory`/model/, see `save_masks`): those are
    loaded into `model` first, in place."""
    check_model(model)
    directory = _directory(directory)
    saved = _saved_config(directory)
    if config is not None:
        _check_same(check_config(config), saved, f"the masks in {directory}")
    check_unmasked(model)
    if METHODS[saved.name].masks_inputs and is_model_dir(directory / MODEL_DIR):
        _load_recovered_weights(model, directory / MODEL_DIR)
    loaded = get_method(saved.name).load(model, directory, saved)
    _remember(loaded, saved)
    return loaded


def export(model: nn.Module, config: MethodConfig | None = None) -> nn.Module:
    """The pruned model as a plain transformers model, made IN PLACE: the hard masks are merged into the
    weights of `model` itself (structural methods return the physically smaller model), ready for
    `save_pretrained`, whose config.json then records the pruning (prune.runs.provenance). `config`: the one
    the masks were made with (the default), or an error. Gating has no such form (its masks depend on each
    input) and raises UserInputError; keep its masks with `save_masks` instead."""
    check_model(model)
    config = _config_of(model, config)
    check_masked(model)
    plain = get_method(config.name).export(model, config)
    for exported in {id(model): model, id(plain): plain}.values():
        release_save(exported)
        vars(exported).pop(ATTACHED, None)
    mark_pruned(plain, config)
    return plain


def train(
    model: nn.Module, objective: Objective, data, config: TrainConfig, run_dir: str | Path, **options
) -> TrainResult:
    """The one trainer on an `attach`ed model: trains its masks on rows of `data` (token blocks [samples,
    seq_len] for a causal LM), with checkpoints, logs and resume under `run_dir`/train/ (see
    prune.training.trainer.train for `options`)."""
    check_model(model)
    if not isinstance(objective, Objective):
        raise UserInputError(
            f"objective must be what prune.attach returned for a learnable method, got {described(objective)} "
            "(one-shot methods return None: their masks are final, with nothing to train)."
        )
    if isinstance(config, dict):
        raise UserInputError(
            "config is a dict; pass prune.TrainConfig(**config) (the keys of a recipe's train section)."
        )
    if not isinstance(config, TrainConfig):
        raise UserInputError(f"config must be a prune.TrainConfig, got {described(config)}.")
    data = check_rows(data, model)
    return trainer.train(model, objective, data, config, _directory(run_dir, "run_dir"), **options)


def recover(
    model: nn.Module,
    config: RecoverConfig | dict,
    data,
    run_dir: str | Path,
    *,
    masks: dict[str, Tensor] | None = None,
    **options,
) -> TrainResult:
    """Recovery training of a pruned model, in place (prune.recovery): its kept weights train with the masks fixed
    (masked LoRA, merged at the end, or a masked full fine-tune), by the one trainer; `model` ends a plain model,
    zero exactly where its masks are, whose config.pruning records the recovery (`recovered`: the mode).

    `model` is pruned: with weight masks attached (`attach`, `load_masks`); or exported (`export`, `oneshot`: its
    config.pruning says so, and the zeros of the targets it names are the masks recovery keeps; a structural
    method's smaller model has none and trains as it is); or merged elsewhere, its masks passed as `masks`
    ({module name: bool keep [out, in]}). `config`: the keys of a recipe's `recover` section (a dict, or a
    prune.recovery.config.RecoverConfig); `data`: the training rows (token blocks [samples, seq_len]); logs and
    checkpoints go to `run_dir`/recover/. `options` are prune.recovery.stage.recover's (task_loss, evaluate for
    keeping the best step, resume, device)."""
    check_model(model)
    config = check_recover_config(config)
    data = check_rows(data, model)
    run_dir = _directory(run_dir, "run_dir")
    made_with = getattr(model, ATTACHED, None)
    record = getattr(getattr(model, "config", None), RECORD_KEY, None)
    if masks is not None:
        masks = check_masks(masks, model)
    elif not wrappers(model):
        masks = _zeros_as_masks(model, record)
    result = stage.recover(model, config, data, run_dir, masks=masks, **options)
    if not wrappers(model):  # input masks (activation sparsity) stay on, with their config and save guard
        release_save(model)
        vars(model).pop(ATTACHED, None)
    if made_with is not None:
        mark_pruned(model, made_with, config.mode)
    elif isinstance(record, dict):
        setattr(model.config, RECORD_KEY, {**record, "recovered": config.mode})
    return result


def _recovered_mode(model: nn.Module) -> str | None:
    """The recovery mode the model's config.pruning records (set by `recover`), None when it never recovered."""
    record = getattr(getattr(model, "config", None), RECORD_KEY, None)
    return record.get("recovered") if isinstance(record, dict) else None


def _load_recovered_weights(model: nn.Module, checkpoint: Path) -> None:
    """Every weight of `model` from the checkpoint `save_masks` wrote after recovery, and its config.pruning
    record; a checkpoint of another architecture is refused."""
    load_states(
        model,
        map(load_file, sorted(checkpoint.glob("*.safetensors"))),
        str(checkpoint),
        "the masks' recovered weights belong to another architecture; pass the base model the masks were made for "
        "(or, if their save was cut short, save them again with prune.save_masks).",
    )
    record = _read_json(checkpoint / CONFIG_NAME).get(RECORD_KEY)
    if isinstance(record, dict):
        setattr(model.config, RECORD_KEY, record)


def _zeros_as_masks(model: nn.Module, record) -> dict[str, Tensor]:
    """The masks of an exported pruned model (its config.pruning names the targets): the zeros of each target
    that has any. A structurally shrunk model has none, and recovery trains its linears as they are."""
    if not isinstance(record, dict):
        raise UserInputError(
            "model is not pruned: it carries no MaskPrune masks and its config records no pruning "
            f"(config.{RECORD_KEY}), so recovery would fine-tune the dense model. Prune it first (prune.oneshot, or "
            "prune.attach / prune.load_masks), or pass the masks of a model pruned elsewhere as masks={module name: "
            "keep}."
        )
    try:
        targets = select_targets(model, record.get("targets"))
    except UserInputError as error:
        raise UserInputError(f"model's config.{RECORD_KEY} names targets the model lacks: {error}") from None
    weights = {name: weight_matrix(model.get_submodule(name)) for name in targets}
    return {name: weight != 0 for name, weight in weights.items() if not weight.all()}


def _remember(model: nn.Module, config: MethodConfig) -> None:
    setattr(model, ATTACHED, config)
    guard_save(model)


def _config_of(model: nn.Module, config: MethodConfig | None) -> MethodConfig:
    """The config the model's masks were made with; a `config` passed as well must be that one."""
    attached = getattr(model, ATTACHED, None)
    if config is None:
        if attached is None:
            raise UserInputError(
                "config is needed: this model's masks were not put on by prune.attach or prune.load_masks; pass "
                "the method config they were made with."
            )
        return attached
    check_config(config)
    if attached is not None:
        _check_same(config, attached, "this model's masks")
    return config


def _check_same(config: MethodConfig, made_with: MethodConfig, what: str) -> None:
    """A config handed in beside masks must be the one they were made with (as `prune export` checks a run's
    recipe.yaml against its masks.json): another one would merge or label them as what they are not."""
    given, saved = config.model_dump(mode="json"), made_with.model_dump(mode="json")
    differ = [key for key in given if key in saved and given[key] != saved[key]]
    if differ or config.name != made_with.name:
        shown = "; ".join(f"{key}: {given[key]!r} given, {saved[key]!r} made with" for key in (differ or ["name"])[:3])
        raise UserInputError(
            f"config differs from the one {what} were made with ({shown}). Leave config out to use theirs."
        )


def _directory(directory, argument: str = "directory") -> Path:
    if not isinstance(directory, (str, Path)):
        raise UserInputError(f"{argument} must be a path (str or pathlib.Path), got {described(directory)}.")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{argument} {str(path)!r} is a file; pass a directory.")
    return path


def _saved_config(directory: Path) -> MethodConfig:
    """The method config recorded beside saved masks (masks.json, or gating.json for a gated model)."""
    for name in SAVED_DESCRIPTIONS:
        if (directory / name).is_file():
            meta = read_mask_config(directory) if name == CONFIG_FILE else _read_json(directory / name)
            break
    else:
        raise UserInputError(
            f"{directory} holds no saved masks ({' or '.join(SAVED_DESCRIPTIONS)}); pass a directory written by "
            "prune.save_masks or a `prune run` directory."
        )
    method, fields = meta.get("method"), meta.get("config")
    if not isinstance(method, str) or not isinstance(fields, dict):
        raise UserInputError(f"{directory / name} does not record the method and its config; save the masks again.")
    try:
        return method_config(method, **{key: value for key, value in fields.items() if key != "name"})
    except UserInputError as error:
        raise UserInputError(f"{directory / name}: {error}") from None


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"{path} is corrupt ({error}); save the masks again.") from None
    if not isinstance(content, dict):
        raise UserInputError(f"{path} is not a MaskPrune description; save the masks again.")
    return content
