"""Checks that need no computation, run before the output directory is claimed and before the first forward:
a recipe that cannot work fails in seconds and leaves the output untouched, not after the dense evaluation.

`check_memory` estimates the peak memory of each stage of a causal-LM run from the model's skeleton (meta
device, no weight read) and the recipe's sizes, and refuses a run that cannot fit, naming the estimate, the
limit and the setting to change, instead of letting the kernel's OOM killer end it (and perhaps other processes
with it). Each stage needs the weights the runtime keeps where it runs (prune.models.preflight.resident_bytes)
plus, an estimate lying 7-8% above measured peaks (benchmarks/RESULTS.md `memory_estimate`):
- calibration: the [calibration_samples, seq_len, hidden] activations of the block-by-block pass, in RAM, plus
  one window's forward;
- training: per micro-batch (train.batch_size x seq_len tokens; train.grad_accum runs micro-batches one after
  another and adds nothing) every block's saved values and the logits (ModelShape.training_bytes_per_token);
  the trained mask values (MethodSpec.trained_per_weight per targeted weight) with their gradients and two
  AdamW moments (4 float32 each); and, with train.distill, the dense teacher's weights;
- recovery (recover.steps): as training, with recover.batch_size, the trained state of what recovery trains
  (prune.runs.preflight._recovery_stage) and, with recover.distill, the teacher;
- evaluation: a perplexity batch (eval.batch_size windows, 1 when unset) or an lm-eval batch (eval.batch_size,
  eval.accuracy.BATCH_SIZE when unset) of seq_len tokens, without gradients (ModelShape.inference_bytes_per_token).
The limit is the free memory where the stage runs (RAM, or the accelerator's), shared by the processes of a CPU
launch (LOCAL_WORLD_SIZE).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from eval.accuracy import BATCH_SIZE as LM_EVAL_BATCH  # lm-eval's batch when eval.batch_size is unset
from prune.core.errors import UserInputError
from prune.core.extras import require
from prune.data import prose
from prune.data.images import DIGITS, ImageDataConfig
from prune.data.text import DataConfig
from prune.methods.spec import MethodSpec
from prune.models.blocks import LINEAR_TYPES, weight_matrix
from prune.models.preflight import (
    GB,
    available_device_memory,
    available_ram,
    resident_bytes,
    shape_of,
    size_of,
)
from prune.models.runtime import Runtime
from prune.recovery.stage import check_targets, recover_targets
from prune.runs.recipe import Recipe
from prune.tasks.base import Task

ADAM_COPIES = 4  # a trained value, its gradient and AdamW's two moments, float32 each


def check_recipe(recipe: Recipe, spec: MethodSpec, resume: bool) -> None:
    """What the recipe alone rules out: training settings for a one-shot method, --resume of one that does not
    recover either, and what the run will need that this machine lacks."""
    if spec.kind == "oneshot" and recipe.train.steps:
        raise UserInputError(
            f"method {spec.name!r} is one-shot; train.steps applies to learnable methods only (recover.steps trains "
            "the kept weights after any method)."
        )
    if resume and spec.kind == "oneshot" and not recipe.recover.steps:
        raise UserInputError(f"method {spec.name!r} is one-shot and has nothing to resume; run without --resume.")
    check_needs(recipe, spec)


def check_needs(recipe: Recipe, spec: MethodSpec) -> None:
    """Before any model loads: npm when a text the recipe names must be fetched, and the optional packages its
    stages will use (lm-eval is checked with the accuracy tasks, the GGUF reader with the embedded model)."""
    if isinstance(recipe.data, DataConfig):
        measured = recipe.eval.extra_texts if recipe.eval.perplexity else []
        for name in dict.fromkeys((recipe.data.source, *recipe.data.mix, *measured)):
            if name in prose.TEXTS:
                prose.check_fetchable(name)
    if isinstance(recipe.data, ImageDataConfig) and recipe.data.source == DIGITS:
        require("sklearn", "the digits images (data.source: digits)")
    if spec.kind == "learnable" and recipe.train.steps and recipe.train.eval_every:
        require("matplotlib", "the training curve (train_curve.png, drawn when train.eval_every is set)")


def check_model(model: nn.Module, recipe: Recipe, spec: MethodSpec, task: type[Task]) -> None:
    """What the loaded model (or the skeleton of a streamed one) rules out, from its config and module names
    alone: the method's targets (an N:M pattern must tile every targeted layer, globs must match), its own check
    (MethodSpec.check), the layers recovery would train (recover.targets must match) and what the task checks
    (for a causal LM: a window longer than its positions, accuracy tasks that cannot run)."""
    if spec.targets is not None:
        spec.targets(model, recipe.method)
    if spec.check is not None:
        spec.check(model, recipe.method)
    if recipe.recover.steps:
        check_targets(model, recipe.recover)
    task.check_model(model, recipe)


WEIGHTS_FIX = "use a smaller runtime.dtype (bfloat16 halves float32), runtime.offload, or a device with more memory"
STATE_FIX = "target fewer layers (method.targets), or use a device with more memory"


@dataclass(frozen=True)
class Stage:
    """One stage's estimated peak, part by part: the weights resident where it runs and what the stage adds, each
    with the setting that shrinks it."""

    name: str
    on_device: bool  # where it runs: the accelerator, or the RAM (also the device of a CPU run)
    parts: dict[str, tuple[int, str]]  # what takes memory -> (bytes, the setting that shrinks it)

    @property
    def total(self) -> int:
        return sum(size for size, _ in self.parts.values())

    def fix(self) -> str:
        """The setting that shrinks the largest part."""
        return max(self.parts.values())[1]


def memory_stages(recipe: Recipe, spec: MethodSpec, runtime: Runtime, skeleton: nn.Module) -> list[Stage]:
    """The stages of the run `recipe` describes, each with its estimated peak (see the module docstring)."""
    size, shape = size_of(skeleton), shape_of(skeleton)
    dtype, seq_len = runtime.dtype, recipe.data.seq_len
    on_device = runtime.device.type != "cpu"
    weights = (resident_bytes(size, runtime, on_device), WEIGHTS_FIX)
    stages = []
    if spec.needs_calibration:
        samples = recipe.data.calibration_samples
        window_fix = "lower data.seq_len"
        stages.append(
            Stage(
                f"calibration ({samples} windows of {seq_len} tokens)",
                False,
                {
                    "weights": (resident_bytes(size, runtime, False), WEIGHTS_FIX),
                    "activations": (
                        samples * seq_len * shape.hidden * dtype.itemsize,
                        "lower data.calibration_samples or data.seq_len",
                    ),
                    "one window": (seq_len * shape.inference_bytes_per_token(dtype), window_fix),
                },
            )
        )
    train = recipe.train
    if spec.kind == "learnable" and train.steps:
        targeted = _targeted_weights(skeleton, recipe, spec)
        per_weight = spec.trained_per_weight(recipe.method) if spec.trained_per_weight is not None else 0.0
        parts = {
            "weights": weights,
            "activations": (
                train.batch_size * seq_len * shape.training_bytes_per_token(dtype),
                "lower train.batch_size (raise train.grad_accum to keep the step's batch) or data.seq_len",
            ),
            "mask training state": (round(targeted * per_weight * ADAM_COPIES * 4), STATE_FIX),
        }
        if train.distill:
            parts["distillation teacher"] = (size.bytes(dtype), "drop train.distill, or " + WEIGHTS_FIX)
        stages.append(
            Stage(
                f"training (train.batch_size {train.batch_size} x data.seq_len {seq_len} tokens per micro-batch)",
                on_device,
                parts,
            )
        )
    if recipe.recover.steps:
        stages.append(_recovery_stage(recipe, spec, skeleton, runtime, weights))
    evaluation = recipe.eval
    if evaluation.perplexity or evaluation.tasks:
        batch = evaluation.batch_size or (LM_EVAL_BATCH if evaluation.tasks else 1)
        activations = batch * seq_len * shape.inference_bytes_per_token(dtype)
        stages.append(
            Stage(
                f"evaluation ({batch} windows of {seq_len} tokens per forward)",
                on_device,
                {"weights": weights, "activations": (activations, "lower eval.batch_size or data.seq_len")},
            )
        )
    return stages


def check_memory(recipe: Recipe, spec: MethodSpec, runtime: Runtime, skeleton: nn.Module) -> None:
    """Refuse a run whose estimated peak (`memory_stages`) exceeds the free memory where a stage runs."""
    free_ram, free_device = available_ram(), available_device_memory(runtime.device)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if runtime.device.type == "cpu" else 1
    for stage in memory_stages(recipe, spec, runtime, skeleton):
        on_device = stage.on_device and free_device is not None
        where, free = (str(runtime.device), free_device) if on_device else ("RAM", free_ram)
        copies = 1 if on_device else processes
        if stage.total * copies > free:
            parts = ", ".join(f"{name} {size / GB:.2f} GB" for name, (size, _) in stage.parts.items())
            each = f"{copies} processes x {stage.total / GB:.2f} GB: " if copies > 1 else ""
            raise UserInputError(
                f"the run does not fit: {stage.name} needs about {stage.total * copies / GB:.2f} GB of {where} "
                f"({each}{parts}; an estimate, see prune/runs/preflight.py), and {free / GB:.2f} GB is free. To fit, "
                f"{stage.fix()}."
            )


def _recovery_stage(recipe: Recipe, spec: MethodSpec, skeleton: nn.Module, runtime: Runtime, weights) -> Stage:
    """Recovery training (prune.recovery) on the pruned model, sized as the dense one (a structural export is
    smaller): the activations of a micro-batch, the trained state (full: each targeted weight's gradient and two
    AdamW moments; lora: each masked layer's [out, in] update, held for the backward with its gradient) and,
    with recover.distill, the teacher."""
    recover, shape, dtype = recipe.recover, shape_of(skeleton), runtime.dtype
    names = spec.targets(skeleton, recipe.method) if recover.targets is None and spec.targets is not None else None
    modules = dict(skeleton.named_modules())
    targeted = sum(  # the linears each target is or holds (activation's cats wraps whole FFNs)
        weight_matrix(linear).numel()
        for name in names or recover_targets(skeleton, recover, {})
        for linear in modules[name].modules()
        if isinstance(linear, LINEAR_TYPES)
    )
    copies = ADAM_COPIES - 1 if recover.mode == "full" else 2  # the weights themselves are counted already
    parts = {
        "weights": weights,
        "activations": (
            recover.batch_size * recipe.data.seq_len * shape.training_bytes_per_token(dtype),
            "lower recover.batch_size (raise recover.grad_accum to keep the step's batch) or data.seq_len",
        ),
        f"recovery state ({recover.mode})": (targeted * copies * 4, "target fewer layers (recover.targets)"),
    }
    if recover.distill:
        parts["distillation teacher"] = (size_of(skeleton).bytes(dtype), "drop recover.distill, or " + WEIGHTS_FIX)
    batch = f"recover.batch_size {recover.batch_size} x data.seq_len {recipe.data.seq_len} tokens per micro-batch"
    return Stage(f"recovery ({batch})", runtime.device.type != "cpu", parts)


def _targeted_weights(skeleton: nn.Module, recipe: Recipe, spec: MethodSpec) -> int:
    if spec.targets is None or spec.trained_per_weight is None:
        return 0
    modules = dict(skeleton.named_modules())
    return sum(weight_matrix(modules[name]).numel() for name in spec.targets(skeleton, recipe.method))
