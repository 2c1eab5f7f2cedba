"""Regularized mask tuning (R-AMT, Zheng et al., ICCV 2023): binary masks on the frozen weights of a
vision-language model, learned through real-valued scores, with gradient dropout towards the zero-shot model.

Mask: one score per targeted weight, initialized at `init_score` (1e-2) above the `threshold` (5e-3), so tuning
starts exactly at the zero-shot model. The forward uses W ⊙ 1[score > threshold]; the backward is straight-
through (the gradient reaches the score as if the mask were the identity of the score), written as
`hard + (score - score.detach())`, whose value is exactly the 0/1 mask.

Loss: the task loss (cross-entropy of logit_scale · cosine(image, class text) for CLIP) plus `score_reg` times
the L2 norm (not squared) of all scores together.

Gradient dropout, per score element: a = ∂(task + regularizer)/∂score, b = ∂KL(p_zero-shot ‖ p_model)/∂score
(temperature 1; the zero-shot reference is the same model with its masks switched off, so no copy is held),
P = ½ (1 + sign(a) (a + b) / (|a| + |b| + 1e-8)), keep = 1[P > U] with U ~ Uniform(0, 1), and the gradient
used is ((1 − λ) + λ · keep) · a. Where a and b agree, P ≈ 1 and all of a is kept; where they conflict, a is
kept whole with probability |a| / (|a| + |b|) and shrunk to (1 − λ) a otherwise. The KL only steers which
gradients are damped; it is never added to the loss.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from torch import Tensor, nn
from torch.nn import functional as F

from prune.core.distributed import local_part, whole
from prune.masks.base import Mask, Objective, hard_masks, weight_masked, wrap, wrappers
from prune.masks.storage import write_masks
from prune.masks.targets import select_by_glob
from prune.masks.with_peft import canonical_name
from prune.methods.binary import config as declared
from prune.methods.binary.config import DEFAULT_TARGETS, BinaryConfig
from prune.methods.spec import MethodSpec
from prune.models.blocks import LINEAR_TYPES, weight_matrix

TARGET_TYPES = (*LINEAR_TYPES, nn.Conv2d)
EPSILON = 1e-8


# ----------------------------------------------------------------------------------------------- tensor math


def keep_probability(a: Tensor, b: Tensor) -> Tensor:
    """P = ½ (1 + sign(a)(a + b)/(|a| + |b| + ε)): ≈1 where a and b agree, |a|/(|a|+|b|) where they conflict."""
    return 0.5 * (1.0 + torch.sign(a) * (a + b) / (a.abs() + b.abs() + EPSILON))


def gradient_dropout(a: Tensor, b: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """((1 − λ) + λ · 1[P > U]) · a, U ~ Uniform(0, 1) drawn elementwise (from `generator` or the global RNG). For
    FSDP shards (DTensors) U is drawn whole and each process keeps its shard's part: one process's draw."""
    uniform = local_part(torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype), a)
    keep = (keep_probability(a, b) > uniform).to(a.dtype)
    return ((1.0 - strength) + strength * keep) * a


# ---------------------------------------------------------------------------------------------------- masks


class BinaryScoreMask(Mask):
    """A 0/1 mask over one weight (any shape), learned through one real score per weight."""

    def __init__(self, shape: torch.Size, init_score: float, threshold: float, device=None):
        super().__init__()
        self.scores = nn.Parameter(torch.full(tuple(shape), float(init_score), device=device))
        self.threshold = float(threshold)
        self.bypass = False  # True: the mask is all ones (the zero-shot model), see `masks_off`

    def hard(self) -> Tensor:
        if self.bypass:
            return torch.ones_like(self.scores, dtype=torch.bool)
        return self.scores.detach() > self.threshold

    def soft(self) -> Tensor:
        """Exactly the 0/1 mask in value; the identity of the score in gradient (straight-through)."""
        if self.bypass:
            return torch.ones_like(self.scores)
        hard = (self.scores > self.threshold).to(self.scores.dtype)
        return hard + (self.scores - self.scores.detach())  # s - s is exactly 0; (hard + s) - s is not

    def extra_repr(self) -> str:
        return f"shape={tuple(self.scores.shape)}, threshold={self.threshold}"


@contextmanager
def masks_off(masks: list[BinaryScoreMask]):
    """Within the block every mask is all ones: the model is the zero-shot model, bit for bit."""
    for mask in masks:
        mask.bypass = True
    try:
        yield
    finally:
        for mask in masks:
            mask.bypass = False


# --------------------------------------------------------------------------------------------------- attach


def binary_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Module names to mask. Every pattern must match something (a typo would silently mask less); a match on a
    peft LoRA layer targets its frozen `base_layer`; the adapter's own weights and already-wrapped modules are
    never targets."""
    wrapped = tuple(f"{name}." for name in wrappers(model))
    candidates: dict[str, str] = {}  # module name matched -> module name masked
    for name, module in model.named_modules():
        if not name or name.startswith(wrapped) or any(part.startswith("lora_") for part in name.split(".")):
            continue
        if isinstance(module, TARGET_TYPES):
            candidates[name] = name
        elif isinstance(getattr(module, "base_layer", None), TARGET_TYPES):
            candidates[name] = f"{name}.base_layer"
    matched = select_by_glob(list(candidates), patterns, "Linear/Conv2d module", example=DEFAULT_TARGETS[0])
    return [candidates[name] for name in matched]


class BinaryObjective(Objective):
    """The L2-norm regularizer of the scores and, when λ > 0, the gradient-dropout backward."""

    def __init__(self, config: BinaryConfig, masks: list[BinaryScoreMask]):
        self.config = config
        self.masks = masks
        self.backward = self.dropout_backward if config.gradient_dropout > 0 else None

    def regularizer(self, model: nn.Module) -> Tensor:
        if not self.masks or self.config.score_reg == 0:
            return torch.zeros(())
        # each mask's sum of squares whole: under FSDP a sum over this process's shard, added up over processes
        squares = torch.stack([whole(mask.scores.float().pow(2).sum()) for mask in self.masks])
        return self.config.score_reg * squares.sum().clamp_min(1e-30).sqrt()

    def dropout_backward(self, model: nn.Module, batch, task_loss, accelerator, scale: float) -> tuple[Tensor, Tensor]:
        """The trainer's gradient hook (see Objective.backward): accumulates `scale` × the dropped-out gradient
        of every score, and the plain gradient of anything else that trains (e.g. a LoRA adapter)."""
        if accelerator.distributed_type == DistributedType.FSDP:
            return self._sharded_dropout_backward(model, batch, task_loss, accelerator, scale)
        core = accelerator.unwrap_model(model)
        trainable = [param for param in core.parameters() if param.requires_grad]
        score_ids = {id(mask.scores) for mask in self.masks}
        with accelerator.no_sync(model):
            task, logits, reference = self._forward_twice(model, batch, task_loss, accelerator)
        regularizer = self.regularizer(core)
        kl = kl_to_reference(logits, reference, self.config.kl_temperature)
        grads_a = torch.autograd.grad(task + regularizer, trainable, retain_graph=True, allow_unused=True)
        scores = [param for param in trainable if id(param) in score_ids]
        grads_b = dict(zip(map(id, scores), torch.autograd.grad(kl, scores, allow_unused=True))) if scores else {}
        for param, a in zip(trainable, grads_a):
            if a is None:
                continue
            if id(param) in score_ids:
                a = self._dropped_out(a, grads_b.get(id(param)))
            if accelerator.num_processes > 1:
                a = accelerator.reduce(a, reduction="mean")
            a = a * scale
            param.grad = a if param.grad is None else param.grad.add_(a)
        return task.detach(), regularizer.detach()

    def _sharded_dropout_backward(
        self, model: nn.Module, batch, task_loss, accelerator, scale: float
    ) -> tuple[Tensor, Tensor]:
        """`dropout_backward` under FSDP, where a gradient exists only as each process's shard of the average over
        the processes, after a backward: two backward passes through the one forward give b (the KL's) and then a
        (the task's and the regularizer's), each averaged by FSDP, and the dropout acts on the shards. So a and b
        are those of the whole batch, as with one process (DDP drops out each process's own a and b instead).
        Gradients are held by name: a name's registered parameter is its shard outside a forward, and the whole
        tensor inside one."""
        core = accelerator.unwrap_model(model)
        earlier = {name: param.grad for name, param in core.named_parameters() if param.requires_grad}
        core.zero_grad(set_to_none=True)
        task, logits, reference = self._forward_twice(model, batch, task_loss, accelerator)
        regularizer = self.regularizer(core)
        kl_to_reference(logits, reference, self.config.kl_temperature).backward(retain_graph=True)
        grads_b = {name: param.grad for name, param in core.named_parameters() if param.requires_grad}
        core.zero_grad(set_to_none=True)
        (task + regularizer).backward()
        score_ids = {id(mask.scores) for mask in self.masks}
        for name, param in core.named_parameters():
            if not param.requires_grad:
                continue
            a = param.grad
            if a is None:  # the task did not reach it: its earlier gradient stays
                param.grad = earlier[name]
                continue
            a = (self._dropped_out(a, grads_b[name]) if id(param) in score_ids else a) * scale
            param.grad = a if earlier[name] is None else earlier[name].add_(a)
        return task.detach(), regularizer.detach()

    def _forward_twice(self, model: nn.Module, batch, task_loss, accelerator) -> tuple[Tensor, Tensor, Tensor]:
        """The task loss and logits of the masked model, and the zero-shot model's logits (masks off, no gradient)."""
        outputs: list = []
        handle = accelerator.unwrap_model(model).register_forward_hook(
            lambda module, args, output: outputs.append(output)
        )
        try:
            task = task_loss(model, batch)
            logits = _logits(outputs[-1]) if outputs else _logits(_forward(model, batch))
            with torch.no_grad(), masks_off(self.masks):
                reference = _logits(_forward(model, batch))
        finally:
            handle.remove()
        return task, logits, reference

    def _dropped_out(self, a: Tensor, b: Tensor | None) -> Tensor:
        """A score's gradient after gradient dropout against the KL's gradient `b` (None: the KL did not reach it)."""
        return gradient_dropout(a, torch.zeros_like(a) if b is None else b, self.config.gradient_dropout)


def kl_to_reference(logits: Tensor, reference: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(reference/T) ‖ softmax(logits/T)), averaged over rows (tokens for an LM, images for CLIP)."""
    flat, target = logits.reshape(-1, logits.shape[-1]).float(), reference.reshape(-1, reference.shape[-1]).float()
    return F.kl_div(
        F.log_softmax(flat / temperature, -1),
        F.log_softmax(target / temperature, -1),
        reduction="batchmean",
        log_target=True,
    )


def _forward(model: nn.Module, batch):
    """The model's output on a batch: a dict's inputs as keywords (labels left out), a tensor as input ids."""
    if isinstance(batch, dict):
        return model(**{key: value for key, value in batch.items() if key != "labels"})
    return model(batch)


def _logits(output) -> Tensor:
    return output.logits if hasattr(output, "logits") else output


def save_binary_masks(model: nn.Module, directory: Path, config: BinaryConfig, meta: dict) -> None:
    """Hard masks as packed bits, under the names of the plain model (a peft model's prefixes dropped)."""
    write_masks({canonical_name(name): keep for name, keep in hard_masks(model).items()}, directory, meta)


def attach_binary(model: nn.Module, config: BinaryConfig, calibration=None) -> BinaryObjective:
    """Wrap every target with a score mask (all kept at step 0); return the objective the trainer uses."""
    modules = dict(model.named_modules())
    masks, wrapped = [], {}
    for name in binary_targets(model, config.targets):
        base = modules[name]
        mask = BinaryScoreMask(weight_matrix(base).shape, config.init_score, config.threshold, base.weight.device)
        wrapped[name] = weight_masked(base, mask)
        masks.append(mask)
    wrap(model, wrapped)
    return BinaryObjective(config, masks)


BINARY = MethodSpec(
    declared.BINARY,
    attach_binary,
    needs_calibration=False,
    save=save_binary_masks,
    fsdp=True,
    targets=lambda model, config: binary_targets(model, config.targets),
)
