"""What the two image tasks share (zero-shot-classification with CLIP, image-classification with a model's own
head): image data from the recipe's `data` section, top-1 accuracy on the held-out images, cross-entropy
training on {"pixel_values", "labels"} rows, and per-image conv FLOPs.

The held-out score the trainer minimizes is the error (1 - accuracy) on the images `eval.limit` counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prune.core.errors import UserInputError
from prune.data.images import ImageRows, load_image_data
from prune.methods.spec import HeldOut
from prune.tasks.base import RunSettings, StageSettings, Task

METHOD_REPORT_IMAGES = 512  # held-out images a method's own report hook measures on (e.g. per-image FLOPs)


@torch.no_grad()
def classifier_accuracy(
    classifier: nn.Module, rows: ImageRows, batch_size: int = 64, limit: int | None = None
) -> float:
    """Top-1 accuracy on the first `limit` (all when None) rows, in order; `classifier(pixel_values).logits`."""
    count = len(rows) if limit is None else min(limit, len(rows))
    if count == 0:
        raise UserInputError("the held-out split is empty; use a larger dataset or heldout_fraction.")
    weight = next(classifier.parameters())
    correct = 0
    for start in range(0, count, batch_size):
        positions = list(range(start, min(start + batch_size, count)))
        logits = classifier(rows.pixel_values(positions).to(weight.device, weight.dtype)).logits
        correct += int((logits.argmax(-1).cpu() == rows.labels[positions]).sum())
    return correct / count


def classification_loss(model: nn.Module, batch: dict) -> Tensor:
    """The trainer's task loss: the cross-entropy a classifier computes when given `labels`."""
    return model(**batch).loss


@dataclass(frozen=True)
class ConvFlops:
    dense: int
    pruned: int  # every conv's FLOPs times its weight's nonzero fraction (what a sparse kernel would run)


@torch.no_grad()
def conv_flops(model: nn.Module, pixel_values: Tensor) -> ConvFlops:
    """FLOPs per image of every Conv2d (2 per multiply-accumulate), from the output shapes of one forward of
    the first image. Only convolutions are counted: a CNN's compute (its linear head is a rounding error)."""
    dense = pruned = 0

    def hook(module: nn.Conv2d, inputs, out: Tensor) -> None:
        nonlocal dense, pruned
        kernel = module.kernel_size[0] * module.kernel_size[1]
        flops = 2 * module.out_channels * (module.in_channels // module.groups) * kernel * out.shape[2] * out.shape[3]
        dense += flops
        pruned += round(flops * int(torch.count_nonzero(module.weight)) / module.weight.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    weight = next(model.parameters())
    try:
        model.eval()
        model(pixel_values[:1].to(weight.device, weight.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return ConvFlops(dense, pruned)


class ImageTask(Task):
    """The image tasks' common part: load the data, train on its rows, score by held-out error."""

    metric = "error"
    unit = "images"

    def __init__(self, model: nn.Module, processor, settings: RunSettings, device: torch.device | None = None):
        super().__init__(model, processor, settings, device)
        self.data = load_image_data(settings.data, self.image_processor, settings.seed)
        self.limit = settings.eval.limit
        heldout = len(self.data.heldout)
        self.data.notes["heldout_images"] = min(self.limit or heldout, heldout)  # what accuracy counts

    @property
    def image_processor(self):
        return self.processor

    def train_data(self) -> ImageRows:
        return self.data.train

    def loss(self, model: nn.Module, batch: dict, stage: StageSettings) -> Tensor:
        """The classifier's cross-entropy (distillation applies to language models only: the recipe refuses it)."""
        return classification_loss(model, batch)

    def heldout_score(self, model: nn.Module, stage: StageSettings) -> float:
        """The error on the held-out images `eval.limit` counts, whichever stage asks."""
        return 1.0 - classifier_accuracy(model, self.data.heldout, self.settings.data.batch_size, self.limit)

    def heldout_accuracy(self) -> dict[str, float]:
        """{dataset name: held-out accuracy} of the current model."""
        return {
            self.data.name: classifier_accuracy(
                self.module, self.data.heldout, self.settings.data.batch_size, self.limit
            )
        }

    def heldout(self) -> HeldOut:
        count = min(self.data.notes["heldout_images"], METHOD_REPORT_IMAGES)
        weight = next(self.module.parameters())
        samples = self.data.heldout.pixel_values(list(range(count))).to(weight.device, weight.dtype)
        return HeldOut(
            samples, name="images", unit="images", per_sample=1, flops=lambda model: conv_flops(model, samples).dense
        )

    def fields(self) -> dict:
        return {"task": self.name, "eval_data": self.data.notes}
