"""`method.name: gating` -- dynamic channel gating, Fire Together Wire Together (Elkerdawy et al., CVPR 2022).

Per input, a small predictor per gated layer chooses which output channels (Conv2d+BN blocks) or FFN
intermediate neurons (per token) to compute; the rest are skipped. The predictors learn by binary
cross-entropy against self-supervised labels from the unmasked layer (prune.methods.gating.predictor); the
wrappers and the sparse FFN path are in prune.methods.gating.layers and prune.methods.gating.sparse_ffn.

Training uses the one trainer, which optimizes mask parameters only: each gate owns its predictor, so exactly
the predictors train. The loss the trainer adds is `regularizer(model)` = w x mean over gated layers of the
BCE between the logits and labels the wrappers recorded in that forward; w drops to 0 once `cooldown` of
the steps have passed.
- decoupled (default): the predictor's input is detached and the backbone frozen; the mask is computed
  without gradient, so the task loss the trainer also computes has no path to the predictors -- their
  gradient is the BCE gradient alone.
- joint: the predictor's input keeps its gradient and every backbone weight trains too (task loss through the
  masked forward + BCE through the predictors' inputs), as in FTWT's joint mode; the run then saves the
  backbone with the predictors.

A gated model has no plain-checkpoint form (its masks depend on the input): the run directory holds the
predictors in `predictors.safetensors` (+ `gating.json`); `prune.load_model(run_dir)` rebuilds the gated
model from the base model and them, and `prune export` refuses.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from prune.core.atomic import read_tensors_with_json, write_tensors_with_json
from prune.core.errors import UserInputError
from prune.masks.base import Objective
from prune.methods.gating import config as declared
from prune.methods.gating.config import GATING_FILE, PREDICTORS_FILE, GatingConfig
from prune.methods.gating.layers import accounting, bypassed, gate_sites, gated_layers, select_gate_sites, summarize
from prune.methods.gating.predictor import GatingMask, LabelRule
from prune.methods.spec import HeldOut, MethodSpec

FORMAT_VERSION = 1


class GatingObjective(Objective):
    """w x mean BCE(logits, labels) over the gated layers of the last forward; w = 0 after the cooldown."""

    def __init__(self, config: GatingConfig, masks: list[GatingMask], backbone: list[nn.Parameter]):
        self.config = config
        self.masks = masks
        self.backbone = backbone
        self.weight = config.loss_weight
        self.last: dict[str, float] = {}

    def begin_step(self, step: int, total_steps: int) -> dict[str, float]:
        self.weight = self.config.loss_weight if step < self.config.cooldown * total_steps else 0.0
        return {"bce_weight": self.weight, **self.last}

    def regularizer(self, model: nn.Module) -> Tensor:
        records = [record for record in (mask.take_record() for mask in self.masks) if record is not None]
        if not records:
            return torch.zeros(())
        losses = torch.stack([F.binary_cross_entropy_with_logits(r.logits.float(), r.labels.float()) for r in records])
        with torch.no_grad():  # logged on the next step's line
            self.last = {
                "bce": float(losses.mean()),
                "keep": float(torch.stack([r.keep.float().mean() for r in records]).mean()),
                "target_keep": float(torch.stack([r.labels.float().mean() for r in records]).mean()),
            }
        return self.weight * losses.mean()

    def extra_parameters(self) -> list[nn.Parameter]:
        return self.backbone if self.config.mode == "joint" else []


def label_rule(config: GatingConfig) -> LabelRule:
    """The labels the predictors learn from, as the config's `target` and `threshold` (or sparsity) say."""
    fraction = config.pattern.fraction if config.target == "uniform" else 0.0
    return LabelRule(config.target, config.threshold, fraction)


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def attach_gating(
    model: nn.Module, config: GatingConfig | None = None, calibration: Tensor | None = None
) -> GatingObjective:
    """Wrap every selected site with a gate (predictor initialized to keep everything); return the objective."""
    config = config or GatingConfig(name="gating")
    sites = select_gate_sites(model, config.targets)
    rule = label_rule(config)

    def make_mask(in_features: int, out_features: int) -> GatingMask:
        return GatingMask(
            in_features,
            out_features,
            rule,
            softmax=config.softmax,
            rank=config.predictor_rank,
            detach_input=config.mode == "decoupled",
            init_bias=config.init_bias,
        )

    layers = gate_sites(model, sites, make_mask, train_masked=config.train_masked, max_union=config.max_union)
    for layer in layers.values():
        layer.mask.to(_device(layer.base)).eval()  # gates act as at inference until the trainer turns them on
    masks = [layer.mask for layer in layers.values()]
    predictor_ids = {id(p) for mask in masks for p in mask.parameters()}
    backbone = [p for p in model.parameters() if id(p) not in predictor_ids]
    if config.mode == "joint":
        for param in backbone:  # read by the trainer's param groups: the backbone moves slower than the gates
            param.lr_scale = config.backbone_lr_scale
    return GatingObjective(config, masks, backbone)


# --------------------------------------------------------------------------------------------- save / restore


def _saved_parameters(model: nn.Module, config: GatingConfig) -> dict[str, nn.Parameter]:
    """The predictors (and, in joint mode, every backbone weight), by their names in the gated model."""
    predictor_ids = {id(p) for layer in gated_layers(model).values() for p in layer.mask.parameters()}
    return {
        name: param for name, param in model.named_parameters() if id(param) in predictor_ids or config.mode == "joint"
    }


def save_gating(model: nn.Module, directory: Path, config: GatingConfig, meta: dict) -> None:
    """predictors.safetensors + gating.json, written atomically (temp files, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = gated_layers(model)
    info = {
        "format_version": FORMAT_VERSION,
        **meta,
        "method": "gating",
        "joint": config.mode == "joint",
        "layers": {
            name: {
                "kind": "ffn" if type(layer).__name__ == "GatedFFN" else "conv",
                "in": layer.mask.predictor.in_features,
                "out": layer.mask.channels,
            }
            for name, layer in layers.items()
        },
    }
    tensors = {name: p.detach().cpu().contiguous() for name, p in _saved_parameters(model, config).items()}
    write_tensors_with_json(directory, PREDICTORS_FILE, tensors, GATING_FILE, info)


def restore_gating(model: nn.Module, directory: Path, config: GatingConfig) -> nn.Module:
    """Gate `model` (the base model the run started from) as the run did and load its saved predictors."""
    info, tensors = read_tensors_with_json(
        Path(directory), PREDICTORS_FILE, GATING_FILE, method="gating", format_version=FORMAT_VERSION
    )
    attach_gating(model, config)
    params = dict(model.named_parameters())
    expected = _saved_parameters(model, config)
    wrong = [
        f"{name} (saved {tuple(t.shape)}, model {tuple(params[name].shape)})"
        for name, t in tensors.items()
        if name in params and params[name].shape != t.shape
    ]
    unknown = [name for name in tensors if name not in params]
    missing = [name for name in expected if name not in tensors]
    if wrong or unknown or missing:
        raise UserInputError(
            f"the predictors in {directory} (model {info.get('model', '?')}) do not fit this model: "
            + "; ".join(
                filter(
                    None,
                    [
                        f"shapes differ: {', '.join(wrong[:3])}" if wrong else "",
                        f"unknown: {', '.join(unknown[:3])}" if unknown else "",
                        f"missing: {', '.join(missing[:3])}" if missing else "",
                    ],
                )
            )
            + ". Load them into the base model the run gated, with the run's method settings."
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return model.eval()


def refuse_export(model: nn.Module, config: GatingConfig) -> nn.Module:
    raise UserInputError(
        "a gated model cannot be exported as a plain checkpoint: which channels it computes depends on each "
        "input, and the predictors that choose them are no part of any transformers model. The run directory "
        "holds them (predictors.safetensors); load the gated model with prune.load_model(run_dir)."
    )


# --------------------------------------------------------------------------------------------------- report


@torch.no_grad()
def measure_gating(model: nn.Module, inputs: Tensor | list, forward=None) -> dict:
    """Per-input FLOPs (dense, gated incl. predictors, reduction) and mask quality over `inputs`, a batch or
    a list of batches; `forward(model, batch)` runs one (default: `model(input_ids=batch)`)."""
    model.eval()
    forward = forward or (lambda m, batch: m(input_ids=batch))
    with accounting(model) as stats:
        for batch in inputs:
            forward(model, batch if torch.is_tensor(batch) and batch.dim() > 1 else batch[None])
    return summarize(stats)


def report_gating(model: nn.Module, config: GatingConfig, heldout: HeldOut, report: dict) -> dict:
    """The pipeline's report entries: per-input FLOPs of the gated layers on the held-out samples (per token of
    a causal LM, per image of a CNN), the share of gated channels skipped (as sparsity.achieved), and each
    sample's FLOPs with the gates' savings subtracted."""
    samples = heldout.samples
    summary = measure_gating(model, list(samples.split(1)), forward=lambda m, batch: m(batch))
    entries = {
        "gating": {heldout.name: len(samples), heldout.unit: summary["inputs"], **summary},
        "sparsity": {"target": config.target_label(), "achieved": 1.0 - summary["keep_fraction"]},
    }
    if "flops" in report:
        with bypassed(model):
            dense = heldout.flops(model)
        per_input = summary["flops_per_input"]
        saved = heldout.per_sample * (per_input["dense"] - per_input["gated"])
        entries["flops"] = {"dense": dense, "pruned": int(round(dense - saved)), "semi_structured": None}
    return entries


GATING = MethodSpec(
    declared.GATING,
    attach_gating,
    needs_calibration=False,
    save=save_gating,
    load=restore_gating,
    export=refuse_export,
    restore=restore_gating,
    report=report_gating,
    fsdp=True,
)
