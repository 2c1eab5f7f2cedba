"""Load a Hugging Face image classifier (AutoModelForImageClassification) with its image processor: the alias
`resnet-digits`, a local directory or a Hub id (`microsoft/resnet-50`, any fine-tuned ViT, ...).

`resnet-digits` is a small HF ResNet (ResNetForImageClassification: a 7x7 stem of 8 channels, three stages of
two basic blocks at 16, 32 and 64 channels) for scikit-learn's handwritten digits, upscaled from 8x8 to 32x32 (the stem
brings them back to an 8x8 grid). It is trained once, on first use, on the images its caller hands over (the
train part of the digits split, prune.tasks.image_classification), saved under the MaskPrune cache and then
loaded like any checkpoint: an offline, trained CNN to prune, in seconds of CPU time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTImageProcessorPil,
)

from prune.core.atomic import staged_directory
from prune.core.errors import UserInputError
from prune.models.loading import cache_root, from_dir_or_hub, is_model_dir

RESNET_DIGITS = "resnet-digits"
DIGITS_SIZE = 32  # input side: 8x8 digits upscaled 4x, which the stem (stride 2 + max-pool) brings back to 8x8
STEM = 8  # the stem sees 3 identical channels (grayscale as RGB): a narrow one saves their cost
WIDTHS = (16, 32, 64)
DEPTHS = (2, 2, 2)
EPOCHS = 30
_OFFLINE_HINT = f"pass a local image-classifier directory saved with save_pretrained, or the alias `{RESNET_DIGITS}`"


def load_image_classifier(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, object]:
    """(image classifier in eval mode, its image processor) for a model directory or a Hub id."""
    kinds = (
        f"an image classifier saved with save_pretrained, a Hub id such as microsoft/resnet-50, or the alias "
        f"`{RESNET_DIGITS}`"
    )
    return from_dir_or_hub(name_or_path, dtype, _from_pretrained, kinds, _OFFLINE_HINT)


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs) -> tuple[PreTrainedModel, object]:
    model_type = AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs).model_type
    try:
        model = AutoModelForImageClassification.from_pretrained(source, dtype=dtype, trust_remote_code=False, **kwargs)
    except ValueError:  # transformers: "Unrecognized configuration class ... for AutoModelForImageClassification"
        raise UserInputError(
            f"{source!r} is a {model_type!r} model, not an image classifier; task image-classification needs a "
            "model with a classification head (AutoModelForImageClassification, e.g. microsoft/resnet-50). For "
            "CLIP use task: zero-shot-classification; for a causal LM, task: causal-lm."
        ) from None
    return model.eval(), AutoImageProcessor.from_pretrained(source, trust_remote_code=False, **kwargs)


def resnet_digits_dir() -> Path:
    return cache_root() / "models" / RESNET_DIGITS


def digits_processor() -> ViTImageProcessorPil:
    """Resize to 32x32 (bilinear) and map [0, 255] to [-1, 1]; the PIL processor needs no torchvision."""
    return ViTImageProcessorPil(
        size={"height": DIGITS_SIZE, "width": DIGITS_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def make_resnet_digits(directory: Path, images: Tensor, labels: Tensor, processor, *, seed: int = 0) -> None:
    """Train the digits ResNet on `images` ([N, 3, 32, 32], preprocessed by `processor`) and save it with the
    processor at `directory`, whole or not at all (a concurrent first use that finishes first wins)."""
    names = {index: str(index) for index in range(10)}
    config = ResNetConfig(
        num_channels=3,
        embedding_size=STEM,
        hidden_sizes=list(WIDTHS),
        depths=list(DEPTHS),
        layer_type="basic",
        num_labels=10,
        id2label=names,
        label2id={v: k for k, v in names.items()},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights whatever thread count the first caller runs with
    try:
        torch.manual_seed(seed)
        model = train_classifier(ResNetForImageClassification(config), images, labels, epochs=EPOCHS, seed=seed)
    finally:
        torch.set_num_threads(threads)
    with staged_directory(directory, complete=is_model_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)


def train_classifier(
    model: PreTrainedModel,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> PreTrainedModel:
    """Plain supervised training (AdamW, cosine decay) with random shifts of up to one digit pixel (4 input
    pixels) as augmentation; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(labels) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    shift = images.shape[-1] // 8
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            rows = order[start : start + batch_size]
            offset = (torch.randint(-1, 2, (2,), generator=generator) * shift).tolist()
            loss = F.cross_entropy(model(torch.roll(images[rows], shifts=offset, dims=(2, 3))).logits, labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()
