"""`method.name: activation` -- training-free activation sparsity (TEAL, CATS): thresholds are the masks.

`attach` calibrates one magnitude threshold per wrapped module on the calibration windows (the train part;
prune.methods.activation.calibrate) and wraps the modules (prune.methods.activation.layers); nothing trains.
Which entries are zero depends on each token, so the sparse model has no plain-checkpoint form: the run
directory holds the thresholds (`thresholds.safetensors` + `thresholds.json`), `prune.load_model(run_dir)`
rebuilds the sparse model from the base model and them, and `prune export` refuses. After recovery (the recipe's
`recover`: the weights trained under the thresholds, prune.recovery), the run also writes model/, the recovered
weights, and load_model(run_dir) wraps those instead of the base model.

The report hook measures on held-out windows what each threshold zeroes (per layer, and model-wide weighted by
the weight columns each entry stands for), the FLOPs a kernel skipping those columns runs, and, when the run
measures latency, decode and prefill speed of the dense and the sparse model timed alternately in this process.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from prune.core.atomic import read_tensors_with_json, write_tensors_with_json
from prune.core.errors import UserInputError, summarize_names
from prune.masks.targets import select_by_glob, select_targets
from prune.methods.activation import config as declared
from prune.methods.activation import kernel
from prune.methods.activation.calibrate import calibrate
from prune.methods.activation.config import INFO_FILE, THRESHOLDS_FILE, ActivationConfig
from prune.methods.activation.layers import (
    Threshold,
    ThresholdedFFN,
    bypassed,
    counting,
    entries,
    is_gated_ffn,
    thresholded,
    wrap,
)
from prune.methods.activation.speed import side_by_side
from prune.methods.spec import HeldOut, MethodSpec
from prune.models.blocks import find_blocks, in_out_features

FORMAT_VERSION = 1
GATED_FFN = "a gated FFN (nn.Linear gate_proj, up_proj, down_proj and an act_fn, as in Llama, Mistral or Qwen)"


def target_names(model: nn.Module, config: ActivationConfig) -> list[str]:
    """The modules thresholds wrap, from the model's structure alone: teal, the linears of the decoder blocks
    (or those `targets` names); cats, the gated FFNs (or those `targets` names). Refuses a model without them."""
    if config.mode == "teal":
        names = select_targets(model, config.targets)
        blocks_name, _ = find_blocks(model)
        outside = [name for name in names if not name.startswith(f"{blocks_name}.")]
        if outside:
            raise UserInputError(
                f"activation sparsity calibrates the decoder blocks ({blocks_name}) one by one, and "
                f"{summarize_names(outside)} lie outside them; leave them out of method.targets."
            )
        return names
    ffns = [name for name, module in model.named_modules() if is_gated_ffn(module)]
    if not ffns:
        _, blocks = find_blocks(model)
        found = ", ".join(f"{name}: {type(child).__name__}" for name, child in blocks[0].named_children())
        raise UserInputError(
            f"method.mode cats thresholds the gate of {GATED_FFN}, and {type(model).__name__} has none (its blocks "
            f"hold {found}). Use method.mode: teal, which thresholds the input of every projection."
        )
    if config.targets is None:
        return ffns
    return select_by_glob(ffns, config.targets, "gated FFN", example="*.mlp")


def attach_activation(
    model: nn.Module, config: ActivationConfig | None = None, calibration: Tensor | None = None
) -> None:
    """Calibrate a threshold per target on `calibration` (token windows of the train part) and wrap the model."""
    config = config or ActivationConfig(name="activation")
    names = target_names(model, config)
    if calibration is None:
        raise UserInputError("activation sparsity calibrates its thresholds on text: pass calibration windows.")
    thresholds = calibrate(model, names, config.pattern.fraction, calibration, config.score, config.allocation)
    wrap(model, thresholds, config.max_tokens)
    model.eval()
    return None


# --------------------------------------------------------------------------------------------- save / restore


def save_thresholds(model: nn.Module, directory: Path, config: ActivationConfig, meta: dict) -> None:
    """thresholds.safetensors (each wrapped module's cut, float32 [entries]) + thresholds.json, written
    atomically."""
    layers = thresholded(model)
    info = {
        "format_version": FORMAT_VERSION,
        **meta,
        "method": "activation",
        "mode": config.mode,
        "score": config.score,
        "allocation": config.allocation,
        "layers": {
            name: {"kind": "ffn" if isinstance(layer, ThresholdedFFN) else "linear", "target": layer.mask.target}
            for name, layer in layers.items()
        },
    }
    tensors = {name: layer.mask.cut.cpu() for name, layer in layers.items()}
    write_tensors_with_json(Path(directory), THRESHOLDS_FILE, tensors, INFO_FILE, info)


def restore_activation(model: nn.Module, directory: Path, config: ActivationConfig) -> nn.Module:
    """Wrap `model` (the base model the run started from) with the run's saved thresholds."""
    directory = Path(directory)
    info, tensors = read_tensors_with_json(
        directory, THRESHOLDS_FILE, INFO_FILE, method="activation", format_version=FORMAT_VERSION
    )
    made = {key: info.get(key) for key in ("mode", "score", "allocation")}
    differ = [
        f"{key} {value!r} (the config says {getattr(config, key)!r})"
        for key, value in made.items()
        if value != getattr(config, key)
    ]
    if differ:
        raise UserInputError(
            f"the thresholds in {directory} were made with {', '.join(differ)}; load them with the run's method "
            "settings."
        )
    expected = set(target_names(model, config))
    missing, unknown = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unknown:
        problems = [f"missing: {summarize_names(missing)}" if missing else "", f"unknown: {summarize_names(unknown)}"]
        raise UserInputError(
            f"the thresholds in {directory} (model {info.get('model', '?')}) do not fit this model ("
            + "; ".join(p for p in problems if p and not p.endswith(": "))
            + "). Load them into the base model the run pruned, with the run's method settings."
        )
    layers = info.get("layers", {})
    modules = dict(model.named_modules())
    wrong = [name for name in expected if tensors[name].shape != (entries(modules[name]),)]
    if wrong:
        raise UserInputError(
            f"the thresholds in {directory} (model {info.get('model', '?')}) do not fit this model's sizes: "
            f"{summarize_names(sorted(wrong))}. Load them into the base model the run pruned."
        )
    order = list(modules)
    thresholds = {
        name: Threshold(tensors[name], float(layers.get(name, {}).get("target", config.pattern.fraction)))
        for name in sorted(expected, key=order.index)
    }
    wrap(model, thresholds, config.max_tokens)
    return model.eval()


def refuse_export(model: nn.Module, config: ActivationConfig) -> nn.Module:
    raise UserInputError(
        "an activation-sparse model cannot be exported as a plain checkpoint: which weight columns it reads "
        "depends on each token, and its thresholds are no part of any transformers model. The run directory "
        "holds them (thresholds.safetensors); load the sparse model with prune.load_model(run_dir)."
    )


# --------------------------------------------------------------------------------------------------- report


def columns_per_entry(model: nn.Module) -> dict[str, int]:
    """Per wrapper, the weights one of its entries stands for: a projection's output size (the column a zero
    input skips); a gated FFN neuron's up row and down column (its gate row is always computed)."""
    weights = {}
    for name, layer in thresholded(model).items():
        if isinstance(layer, ThresholdedFFN):
            weights[name] = 2 * layer.base.up_proj.in_features
        else:
            weights[name] = in_out_features(layer.base)[1]
    return weights


def dense_weights(model: nn.Module) -> int:
    """Weights the wrapped modules read per token when nothing is zero (a gated FFN's gate included)."""
    total = 0
    for layer in thresholded(model).values():
        if isinstance(layer, ThresholdedFFN):
            total += 3 * layer.base.up_proj.in_features * layer.base.up_proj.out_features
        else:
            total += in_out_features(layer.base)[0] * in_out_features(layer.base)[1]
    return total


@torch.no_grad()
def measure_zeroed(model: nn.Module, samples: Tensor) -> dict:
    """What each threshold zeroes on `samples` (one forward per sample): per layer, and model-wide as the share
    of the wrapped modules' weights a token does not need to read."""
    model.eval()
    with counting(model) as counts:
        for sample in samples.split(1):
            model(sample)
    per_entry = columns_per_entry(model)
    tokens = samples.numel()
    skipped = sum(per_entry[name] * count.zeroed / tokens for name, count in counts.items())
    total = dense_weights(model)
    return {
        "layers": {
            name: {"zeroed": count.fraction, "target": thresholded(model)[name].mask.target}
            for name, count in counts.items()
        },
        "weights_skipped": skipped / total if total else 0.0,
        "entries_zeroed": sum(c.zeroed for c in counts.values()) / max(sum(c.entries for c in counts.values()), 1),
    }


def report_activation(model: nn.Module, config: ActivationConfig, heldout: HeldOut, report: dict) -> dict:
    """The pipeline's report entries: per-layer zeroed shares on held-out windows, sparsity.achieved (the share
    of the wrapped weights a token skips), FLOPs with those columns skipped, and dense vs sparse speed."""
    zeroed = measure_zeroed(model, heldout.samples)
    entries: dict = {
        "activation": {heldout.name: len(heldout.samples), "mode": config.mode, **zeroed},
        "sparsity": {"target": config.target_label(), "achieved": zeroed["weights_skipped"]},
    }
    if "flops" in report:
        with bypassed(model):
            dense = heldout.flops(model)
        saved = 2 * heldout.per_sample * zeroed["weights_skipped"] * dense_weights(model)
        entries["flops"] = {"dense": dense, "pruned": int(round(dense - saved)), "semi_structured": None}
    if "latency" in report:
        entries["speed"] = {"kernel": kernel.backend(), **side_by_side(model)}
    return entries


ACTIVATION = MethodSpec(
    declared.ACTIVATION,
    attach_activation,
    needs_calibration=True,
    save=save_thresholds,
    load=restore_activation,
    export=refuse_export,
    restore=restore_activation,
    report=report_activation,
    targets=target_names,
)
