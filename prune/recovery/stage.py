"""Recovery training: the kept weights of a pruned model train with its masks fixed, by the one trainer.

The input is a pruned model: with its weight masks attached (one-shot methods, nm_gumbel, binary; their hard
values are used and stay fixed), or plain with the masks passed by module name (a merged model), or plain
without masks (a structural method's exported, physically smaller model), or with masks on its modules' inputs
(activation sparsity's thresholds, `MaskWrapper.masks_inputs`), which stay in the forward, fixed, so the weights
learn to work with the inputs they leave. In order:

1. the weight masks are fixed and merged: every pruned weight is exactly zero in the weights themselves;
2. targets: `recover.targets` globs over the Linear (and GPT-2 Conv1D) modules, named as in the unwrapped model;
   by default the weight-masked ones, or the linears inside the input masks' wrappers, or, when the model has no
   masks, every linear inside the decoder blocks;
3. `lora`: peft LoRA adapters on the targets, masked by each target's mask (prune.masks.masked_lora);
   `full`: each masked target is wrapped again with its fixed mask, so the forward computes W ⊙ M and a pruned
   weight's gradient is exactly zero; under AdamW its moments stay zero, its update is exactly zero and decoupled
   weight decay multiplies zero, so it cannot come back (tests check the raw weights); unmasked targets train as
   they are;
4. the one trainer trains that and nothing else (checkpoints, bit-exact resume, FSDP, progress, log) into
   `run_dir/recover/`; with `eval_every`, the parameters of the best validation score are kept (the pruned model
   at step 0 competes too), else the last;
5. merge: adapters folded in (masked), weight-mask wrappers merged: a plain model again, zero exactly where the
   masks are (input masks stay: the sparse model with its trained weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from prune.core import rng
from prune.core.errors import UserInputError
from prune.masks.base import Objective, attach_hard_masks, weight_masks, wrappers
from prune.masks.masked_lora import add_lora, fan_in_fan_out, merge_lora
from prune.masks.targets import refuse_tied, select_by_glob, select_targets
from prune.models.blocks import LINEAR_TYPES
from prune.recovery.config import RecoverConfig
from prune.training.trainer import Evaluate, TaskLoss, TrainResult, keep_best, lm_loss, train

STAGE = "recover"  # the recipe section, and the run directory's sub-directory of its log and checkpoints


class Recovery(Objective):
    """Recovery as a stage of the trainer: the given parameters train (LoRA factors or kept weights), no
    regularizer. They are found by identity in whatever module the trainer passes (the model, or a classifier
    holding it), so names follow that module."""

    label = "recover"

    def __init__(self, params: list[nn.Parameter]):
        self.params = params

    def trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        wanted = {id(param) for param in self.params}
        return {name: param for name, param in model.named_parameters() if id(param) in wanted}


def recover(
    model: nn.Module,
    config: RecoverConfig,
    data: Tensor | Sequence,
    run_dir: str | Path,
    *,
    masks: dict[str, Tensor] | None = None,
    module: nn.Module | None = None,
    task_loss: TaskLoss = lm_loss,
    evaluate: Evaluate | None = None,
    eval_metric: str = "perplexity",
    resume: bool = False,
    accelerator: Accelerator | None = None,
    device: torch.device | None = None,
    shaping: Sequence[str] = (),
) -> TrainResult:
    """Train the kept weights of the pruned `model` with its masks fixed (see the module doc), in place; `model`
    ends plain (adapters and masks merged), zero exactly where the masks are. `masks` ({module name: [out, in]
    bool}, e.g. read back with prune.masks.storage.read_masks) belong to a plain model whose masks were merged; a
    model with weight masks attached brings its own. `module` is what runs a batch when that is not `model`
    itself (CLIP's zero-shot classifier holding it): `task_loss` and `evaluate` receive it, and target names are
    `model`'s. Logs and checkpoints go to `run_dir/recover/`; the other arguments are the trainer's (`shaping`:
    the settings a divergence message names besides recover.lr). Input masks (activation sparsity) stay on."""
    fixed = _fix_masks(model, masks or {})
    targets = recover_targets(model, config, fixed)
    rng.seed_all(config.seed)  # the LoRA factors' initial values
    if config.mode == "lora":
        names = add_lora(model, targets, fixed, config.rank, config.alpha)
    else:
        attach_hard_masks(model, {name: keep for name, keep in fixed.items() if name in targets})
        names = [f"{name}.base.weight" if name in fixed else f"{name}.weight" for name in targets]
    current = dict(model.named_parameters())
    objective = Recovery([current[name] for name in names])
    runner = module if module is not None else model
    result = train(
        runner,
        objective,
        data,
        config,
        Path(run_dir),
        task_loss=task_loss,
        evaluate=evaluate,
        eval_metric=eval_metric,
        resume=resume,
        accelerator=accelerator,
        device=device,
        shaping=shaping,
        stage=STAGE,
    )
    keep_best(runner, objective, Path(run_dir), result, STAGE)
    if config.mode == "lora":
        merge_lora(model)
    else:
        _merge_weight_masks(model)
    model.requires_grad_(False)
    return result


def _fix_masks(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every weight mask of the model, hard and fixed, merged into the weights (so the weights are zero where
    the masks are); `masks` of a merged model go back on first. Refuses a model with masks of another kind."""
    attach_hard_masks(model, masks)
    weighted = weight_masks(model)
    others = sorted(
        name for name, wrapper in wrappers(model).items() if name not in weighted and not wrapper.masks_inputs
    )
    if others:
        raise UserInputError(
            f"recovery trains a model whose masks act on weights or inputs, but {others[0]} (and {len(others) - 1} "
            "more) masks what it computes instead (a structural gate or a per-input predictor). Export a structural "
            "method's model first (prune.export) and recover the smaller model; per-input gating has no model to "
            "recover."
        )
    fixed = {name: keep.detach().cpu() for name, keep in weighted.items()}
    _merge_weight_masks(model)
    return fixed


def _merge_weight_masks(model: nn.Module) -> None:
    """Replace each weight-mask wrapper by a plain copy of its base with the mask baked in; input masks stay."""
    for name in weight_masks(model):
        model.set_submodule(name, wrappers(model)[name].merged())


def recover_targets(model: nn.Module, config: RecoverConfig, masks: dict[str, Tensor]) -> list[str]:
    """The Linear/Conv1D modules recovery trains: `config.targets` globs, else the masked linears, else the linears
    inside input masks' wrappers, else (no masks: a structurally shrunk model) every linear inside the decoder
    blocks. Under input masks, the globs match the names of the unwrapped model (`mlp.up_proj`, not
    `mlp.base.up_proj`), which the answer translates back."""
    inputs_masked = [name for name, wrapper in wrappers(model).items() if wrapper.masks_inputs]
    if inputs_masked:
        return _inside_input_masks(model, config, inputs_masked)
    modules = dict(model.named_modules())
    if config.targets is None and masks:
        targets = [name for name in masks if isinstance(modules.get(name), LINEAR_TYPES)]
        if not targets:
            raise UserInputError(
                f"the model's masks are on {', '.join(sorted(masks)[:3])}, none of them a linear layer, and recovery "
                "trains linear layers; name the layers to train in recover.targets."
            )
        return targets
    try:
        return select_targets(model, config.targets)
    except UserInputError as error:
        raise UserInputError(f"recover.targets: {error}") from None


def _inside_input_masks(model: nn.Module, config: RecoverConfig, wrapped: list[str]) -> list[str]:
    """Recovery's targets in a model with input masks: the linears each wrapper holds (`config.targets` None), or
    every linear whose unwrapped name a glob matches; returned by their names in `model`."""
    linears = [name for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]
    by_plain_name = {_unwrapped_name(name, wrapped): name for name in linears}
    if config.targets is None:
        return [name for name in linears if _unwrapped_name(name, wrapped) != name]
    try:
        selected = [
            by_plain_name[name] for name in select_by_glob(list(by_plain_name), config.targets, "linear module")
        ]
    except UserInputError as error:
        raise UserInputError(f"recover.targets: {error}") from None
    refuse_tied(model, selected, "recover.targets")
    return selected


def _unwrapped_name(name: str, wrapped: list[str]) -> str:
    """A module's name once the wrappers in `wrapped` are gone: `<wrapper>.base` is the wrapper's own name."""
    for prefix in wrapped:
        if name == f"{prefix}.base" or name.startswith(f"{prefix}.base."):
            return prefix + name[len(prefix) + len(".base") :]
    return name


def check_targets(model: nn.Module, config: RecoverConfig) -> None:
    """What the model's structure alone rules out (before the run directory is claimed): `recover.targets` that
    match no linear layer, or, for LoRA, that mix GPT-2's Conv1D layers with nn.Linear ones."""
    if config.targets is None:
        return
    targets = recover_targets(model, config, {})
    if config.mode == "lora":
        fan_in_fan_out(model, targets)
