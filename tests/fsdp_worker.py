"""Run by `accelerate launch --multi_gpu --num_processes 2 -m tests.fsdp_worker OUT` (see tests/test_fsdp.py): for
every case in CASES (a learnable method on a tiny model) trains its masks sharded with accelerate's FSDP2 over
gloo, once straight through (OUT/<case>/full, the method's own files written as a run writes them into
OUT/<case>/saved) and once interrupted in step 3 and resumed in the same processes (OUT/<case>/resumed); writes
each process's share of the mask parameters and AdamW state to OUT/<case>/shares-rank<r>.json.

accelerate applies an FSDP plugin only on accelerators (on a CPU it silently falls back to DDP), so this worker
switches accelerate's shared state to FSDP after building the Accelerator: the trainer then runs exactly the
code path it runs on GPUs, over gloo."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn

from prune.masks.base import Objective, hard_masks
from prune.masks.storage import write_masks
from prune.methods.registry import get_method
from prune.models.clip import load_clip
from prune.tasks.classification import classification_loss
from prune.tasks.zero_shot import ZeroShotClassifier
from prune.training import trainer
from prune.training.config import TrainConfig
from prune.training.sharded import local_numel
from prune.training.trainer import TaskLoss, lm_loss, train
from tests.conftest import make_tiny_llama, make_tiny_resnet
from tests.test_train import CountingObjective, interrupting_loss, masked_tiny_llama, patterned_tokens

INTERRUPTED_IN = 3  # the step whose first task loss raises KeyboardInterrupt; step-2 is the checkpoint in force


def fsdp_accelerator() -> Accelerator:
    accelerator = Accelerator(cpu=True)
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
        shared["device"] = torch.device("cpu")
    new_fsdp_plugin()
    return accelerator


def new_fsdp_plugin() -> None:
    """A fresh FSDP2 plugin in accelerate's shared state: the first prepare stores its model's block classes in the
    plugin, so each model type needs its own. One shard group per block (the model's _no_split_modules), as
    recipes/accelerate/fsdp.yaml."""
    AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
    )


def shares(accelerator: Accelerator) -> dict:
    """Elements this process holds of the (last prepared) masks and their AdamW state."""
    model, optimizer = accelerator._models[-1], accelerator._optimizers[-1]
    masks = [param for param in model.parameters() if param.requires_grad]
    state = [
        value
        for values in optimizer.optimizer.state.values()
        for value in values.values()
        if torch.is_tensor(value) and value.dim() > 0
    ]
    return {
        "mask_elements": sum(local_numel(p) for p in masks),
        "mask_total": sum(p.numel() for p in masks),
        "optimizer_elements": sum(local_numel(v) for v in state),
        "optimizer_total": sum(v.numel() for v in state),
        "world": accelerator.num_processes,
        "sharded": trainer.is_sharded(accelerator),
    }


@dataclass
class Setup:
    """One case ready to train: the module that trains, its objective, its rows and task loss, `save(directory)`
    writing the method's own files from the (gathered) masks, as a run writes them, and how far its trained floats
    may be from one process's."""

    model: nn.Module
    objective: Objective
    data: Any
    task_loss: TaskLoss
    save: Callable[[Path], None]
    tolerance: float = 1e-4  # the averaged gradient is summed in another order than one process's


def _method(model: nn.Module, name: str, **fields) -> tuple[Objective, Callable[[Path], None]]:
    """Attach method `name` to `model`; returns its objective and its save hook bound to `model`."""
    spec = get_method(name)
    config = spec.config_class.model_validate({"name": name, **fields})
    objective = spec.attach(model, config, None)
    return objective, lambda directory: spec.save(model, directory, config, {})


def _lm(make: Callable[[], nn.Module], method: str, **fields) -> Callable[[Path], Setup]:
    """A case of `method` on a tiny language model, trained on counting token rows."""

    def build(workdir: Path) -> Setup:
        model = make()
        objective, save = _method(model, method, **fields)
        return Setup(model, objective, patterned_tokens(), lm_loss, save)

    return build


def images(size: int, classes: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(16, 3, size, size, generator=generator)
    labels = torch.randint(0, classes, (16,), generator=generator)
    return [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(16)]


def toy(workdir: Path) -> Setup:
    model = masked_tiny_llama()
    return Setup(
        model,
        CountingObjective(),
        patterned_tokens(),
        lm_loss,
        lambda directory: write_masks(hard_masks(model), directory, {}),
    )


def gating_resnet(workdir: Path) -> Setup:
    model = make_tiny_resnet()
    objective, save = _method(model, "gating")
    return Setup(model, objective, images(16, 10), classification_loss, save)


def binary_clip(workdir: Path) -> Setup:
    """R-AMT on the zero-shot classifier of the tiny CLIP in workdir/clip (whose frozen logit_scale is a 0-dim
    parameter, which FSDP2 cannot shard)."""
    clip, processor = load_clip(str(workdir / "clip"))
    model = ZeroShotClassifier(clip, processor.tokenizer, ["cat", "dog", "bird"], ["{}."])
    objective, save = _method(clip, "binary")
    # gradient dropout keeps an element where P > U: where the rounding of P differs from one process's near U,
    # that element's step differs (a few scores in 10^5)
    return Setup(model, objective, images(32, 3), classification_loss, save, tolerance=1e-3)


ALL_UNITS = {"heads": True, "ffn": True, "hidden": True, "layers": True}
CASES: dict[str, Callable[[Path], Setup]] = {
    "toy": toy,  # the trainer alone: sigmoid-score masks and a regularizer on the sharded masks
    # untied embeddings: the hidden gate's shard group reshards after its forward, the blocks read the gate whole
    "vib": _lm(make_tiny_llama, "vib", target={"params": 0.3}, units=ALL_UNITS),
    "gating": _lm(make_tiny_llama, "gating"),  # decoupled: only the predictors' BCE trains
    "gating-joint": _lm(make_tiny_llama, "gating", mode="joint"),  # the backbone trains too
    "gating-resnet": gating_resnet,
    "binary": binary_clip,
}


def settings(world: int) -> TrainConfig:
    """Global batch 4 under any number of processes (2 x 2 rows sharded, 1 x 4 alone)."""
    return TrainConfig(steps=4, batch_size=4 // world, lr=0.05, log_every=2, checkpoint_every=2, warmup_fraction=0.0)


def run_case(name: str, out: Path, accelerator: Accelerator) -> None:
    config = settings(accelerator.num_processes)

    def fresh() -> Setup:  # what a new process would start from: accelerate forgets the models prepared before
        accelerator.free_memory()
        new_fsdp_plugin()
        return CASES[name](out)

    setup = fresh()
    train(
        setup.model,
        setup.objective,
        setup.data,
        config,
        out / name / "full",
        task_loss=setup.task_loss,
        accelerator=accelerator,
    )
    (out / name / f"shares-rank{accelerator.process_index}.json").write_text(json.dumps(shares(accelerator)))
    if accelerator.is_main_process:
        setup.save(out / name / "saved")
    again = fresh()
    try:
        train(
            again.model,
            again.objective,
            again.data,
            config,
            out / name / "resumed",
            accelerator=accelerator,
            task_loss=interrupting_loss(INTERRUPTED_IN, again.task_loss),
        )
    except KeyboardInterrupt:
        pass
    again = fresh()
    train(
        again.model,
        again.objective,
        again.data,
        config,
        out / name / "resumed",
        task_loss=again.task_loss,
        accelerator=accelerator,
        resume=True,
    )


def main(out: Path, names: list[str]) -> None:
    """`out` holds the tiny CLIP (out/clip) the binary case loads."""
    torch.set_num_threads(1)
    accelerator = fsdp_accelerator()
    for name in names:
        run_case(name, out, accelerator)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or list(CASES))
