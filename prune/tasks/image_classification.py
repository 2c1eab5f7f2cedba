"""The image-classification task: any Hugging Face image classifier (AutoModelForImageClassification) on an
image dataset (prune.data.images: scikit-learn's digits, a local image folder, a Hub dataset), scored by the
top-1 accuracy of the model's own head on the held-out images.

Dataset classes are matched to the head's outputs by name (the model's id2label), so a classifier fine-tuned
on a dataset scores on it whatever order either lists its classes in. The offline alias `resnet-digits`
(prune.models.image_classifier) is trained on first use on the train part of the default digits split, the
split this task then holds out from, so its held-out images are never ones it trained on.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from eval.flops import count_params
from prune.core.errors import UserInputError
from prune.data.images import DIGITS, ImageDataConfig, load_image_data
from prune.models.image_classifier import (
    RESNET_DIGITS,
    digits_processor,
    load_image_classifier,
    make_resnet_digits,
    resnet_digits_dir,
)
from prune.models.loading import is_model_dir
from prune.tasks.base import RunSettings
from prune.tasks.classification import ImageTask, conv_flops

ALIAS_SEED = 0  # resnet-digits trains on the train part of the default digits split drawn with this seed


class ImageClassification(ImageTask):
    """`task: image-classification`: images in, the accuracy of the model's own head out."""

    name = "image-classification"

    def __init__(self, model: nn.Module, processor, settings: RunSettings, device: torch.device | None = None):
        _check_alias_split(settings)
        super().__init__(model, processor, settings, device)
        outputs = head_indices(self.data.class_names, model.config.id2label)
        for rows in (self.data.train, self.data.heldout):
            rows.labels = outputs[rows.labels]

    @classmethod
    def load_model(cls, name_or_path: str, dtype: torch.dtype):
        if name_or_path == RESNET_DIGITS:
            directory = resnet_digits_dir()
            if not is_model_dir(directory):
                build_resnet_digits(directory)
            name_or_path = str(directory)
        return load_image_classifier(name_or_path, dtype)

    @staticmethod
    def note(report: dict) -> str:
        images = report["eval_data"]
        return (
            f"Accuracy of the model's own classification head on {images['heldout_images']} held-out images "
            f"({images['heldout']}), {images['classes']} classes; the pruned model was tuned on "
            f"{images['train_images']} training images. FLOPs: every convolution's, per image (pruned: what a "
            "sparse kernel would run; gated: the channels each image's predictors chose, predictors counted)."
        )

    def measure(self, label: str) -> dict:
        """Held-out accuracy, parameters and (eval.flops) conv FLOPs per image."""
        start = time.perf_counter()
        self.model.eval()
        params = count_params(self.model)
        figures = {"accuracy": self.heldout_accuracy(), "params": {"total": params.total, "nonzero": params.nonzero}}
        if self.settings.eval.flops:
            flops = conv_flops(self.model, self.data.heldout.pixel_values([0]))
            figures["flops"] = {"dense": flops.dense, "pruned": flops.pruned}
        figures["seconds"] = time.perf_counter() - start
        return figures


def _check_alias_split(settings: RunSettings) -> None:
    """resnet-digits evaluated on digits must hold out what it was trained without: the default split."""
    data = settings.data
    default = ImageDataConfig()
    if (
        settings.model == RESNET_DIGITS
        and data.source == DIGITS
        and (settings.seed, data.heldout_fraction) != (ALIAS_SEED, default.heldout_fraction)
    ):
        raise UserInputError(
            f"{RESNET_DIGITS} was trained on the digits outside the default held-out split (seed {ALIAS_SEED}, "
            f"data.heldout_fraction {default.heldout_fraction}); with seed {settings.seed} and heldout_fraction "
            f"{data.heldout_fraction} the held-out images would include ones it trained on. Keep the defaults, "
            "or evaluate another model."
        )


def build_resnet_digits(directory: Path) -> None:
    """Train and cache the alias on the train part of the default digits split (all its images)."""
    print(f"maskprune: training {RESNET_DIGITS} on scikit-learn's digits (once)...", file=sys.stderr)
    processor = digits_processor()
    train = load_image_data(ImageDataConfig(source=DIGITS), processor, ALIAS_SEED).train
    make_resnet_digits(directory, train.pixel_values(list(range(len(train)))), train.labels, processor)
    print(f"maskprune: cached {RESNET_DIGITS} at {directory}", file=sys.stderr)


def _normalized(name: str) -> str:
    return name.replace("_", " ").strip().lower()


def head_indices(class_names: list[str], id2label: dict) -> Tensor:
    """The head's output index of each dataset class: by name when the head names every class (case and '_'
    vs ' ' ignored); in order when the head has one output per class under placeholder names (LABEL_0, ...)."""
    outputs = {_normalized(str(label)): int(index) for index, label in id2label.items()}
    wanted = [_normalized(name) for name in class_names]
    if all(name in outputs for name in wanted):
        return torch.tensor([outputs[name] for name in wanted])
    if len(outputs) == len(wanted) and all(re.fullmatch(r"label \d+", name) for name in outputs):
        return torch.arange(len(wanted))
    missing = [name for name, key in zip(class_names, wanted) if key not in outputs]
    raise UserInputError(
        f"the model's head has {len(outputs)} classes ({', '.join(list(id2label.values())[:5])}, ...), which do not "
        f"include the dataset's {', '.join(missing[:5])}; use a classifier fine-tuned on these classes, or set "
        "data.class_names to the head's names for them, in the dataset's label order."
    )
