"""The zero-shot classification task: CLIP as a classifier over fixed class prompts.

The classifier is CLIP's zero-shot head: each class is the mean of the normalized text embeddings of its
prompts ("a photo of a {}."), and an image's logits are logit_scale · cosine(image, class). The class
embeddings are cached while nothing in the text tower trains (and recomputed when its modules change, e.g.
masks merged), and computed at every forward while text-side masks or adapters train.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from eval.flops import count_params
from prune.core.errors import UserInputError
from prune.data.images import ImageData, ImageRows
from prune.masks.base import MaskWrapper

TASK = "zero-shot-classification"


@dataclass
class ZeroShotOutput:
    logits: Tensor
    loss: Tensor | None = None


class ZeroShotClassifier(nn.Module):
    """CLIP as a classifier over fixed class prompts: forward(pixel_values, labels=None) -> logits (and loss)."""

    def __init__(self, clip: nn.Module, tokenizer, class_names: list[str], templates: list[str]):
        super().__init__()
        self.clip = clip
        self.shape = (len(class_names), len(templates))
        tokens = tokenizer([template.format(name) for name in class_names for template in templates],
                           padding=True, return_tensors="pt")
        device = next(clip.parameters()).device
        self.register_buffer("input_ids", tokens["input_ids"].to(device), persistent=False)
        self.register_buffer("attention_mask", tokens["attention_mask"].to(device), persistent=False)
        self._cached: tuple[tuple, Tensor] | None = None  # (text tower's module ids, class embeddings)

    def _text_key(self) -> tuple | None:
        """Identifies the text tower's current modules, or None when it may change between forwards (masks that
        train, or anything in it that requires grad): then the class embeddings are recomputed every time."""
        modules = [*self.clip.text_model.modules(), self.clip.text_projection]
        trains = any(isinstance(module, MaskWrapper) and module.mask.training for module in modules) or \
            any(param.requires_grad for module in modules for param in module.parameters(recurse=False))
        return None if trains else (self.input_ids.device, *map(id, modules))

    def class_embeddings(self) -> Tensor:
        """[classes, dim] unit vectors: the mean of each class's normalized prompt embeddings, renormalized."""
        key = self._text_key()
        if key is not None and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        with torch.set_grad_enabled(torch.is_grad_enabled() and key is None):
            output = self.clip.text_model(input_ids=self.input_ids, attention_mask=self.attention_mask)
            text = F.normalize(self.clip.text_projection(output.pooler_output), dim=-1)
            classes = F.normalize(text.reshape(*self.shape, -1).mean(1), dim=-1)
        self._cached = (key, classes.detach()) if key is not None else None
        return classes

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> ZeroShotOutput:
        pooled = self.clip.vision_model(pixel_values=pixel_values).pooler_output
        image = F.normalize(self.clip.visual_projection(pooled), dim=-1)
        classes = self.class_embeddings()
        logits = self.clip.logit_scale.exp() * image @ classes.to(image.dtype).t()
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ZeroShotOutput(logits=logits, loss=loss)


def classification_loss(model: nn.Module, batch: dict) -> Tensor:
    """The trainer's task loss: cross-entropy of the zero-shot logits."""
    return model(**batch).loss


@torch.no_grad()
def zero_shot_accuracy(classifier: nn.Module, rows: ImageRows, batch_size: int = 64, limit: int | None = None) -> float:
    """Top-1 accuracy on the first `limit` (all when None) rows, in order."""
    count = len(rows) if limit is None else min(limit, len(rows))
    if count == 0:
        raise UserInputError("the held-out split is empty; use a larger dataset or heldout_fraction.")
    device = next(classifier.parameters()).device
    correct = 0
    for start in range(0, count, batch_size):
        positions = list(range(start, min(start + batch_size, count)))
        logits = classifier(rows.pixel_values(positions).to(device)).logits
        correct += int((logits.argmax(-1).cpu() == rows.labels[positions]).sum())
    return correct / count


def measure(classifier: nn.Module, data: ImageData, limit: int | None, batch_size: int) -> dict:
    """The figures of one model, keyed like an LLM run's report: accuracy on the held-out split, parameters."""
    start = time.perf_counter()
    classifier.eval()
    params = count_params(classifier.clip)
    return {
        "accuracy": {data.name: zero_shot_accuracy(classifier, data.heldout, batch_size, limit)},
        "params": {"total": params.total, "nonzero": params.nonzero},
        "seconds": time.perf_counter() - start,
    }
