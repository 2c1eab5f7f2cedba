"""The zero-shot-classification task: CLIP as a classifier over fixed class prompts.

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
from prune.masks.base import MaskWrapper, masked_fractions
from prune.models.clip import load_clip
from prune.tasks.base import RunSettings
from prune.tasks.classification import ImageTask


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
        tokens = tokenizer(
            [template.format(name) for name in class_names for template in templates], padding=True, return_tensors="pt"
        )
        device = next(clip.parameters()).device
        self.register_buffer("input_ids", tokens["input_ids"].to(device), persistent=False)
        self.register_buffer("attention_mask", tokens["attention_mask"].to(device), persistent=False)
        self._cached: tuple[tuple, Tensor] | None = None  # (text tower's module ids, class embeddings)

    @property
    def _no_split_modules(self) -> list[str]:
        """CLIP's blocks: an FSDP launch (accelerate) gives each its own shard group, as in a transformers model."""
        return self.clip._no_split_modules

    def _text_key(self) -> tuple | None:
        """Identifies the text tower's current modules, or None when it may change between forwards (masks that
        train, or anything in it that requires grad): then the class embeddings are recomputed every time."""
        modules = [*self.clip.text_model.modules(), self.clip.text_projection]
        trains = any(isinstance(module, MaskWrapper) and module.mask.training for module in modules) or any(
            param.requires_grad for module in modules for param in module.parameters(recurse=False)
        )
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


class ZeroShotClassification(ImageTask):
    """`task: zero-shot-classification`: CLIP's zero-shot head (class prompts) on images, scored by accuracy."""

    name = "zero-shot-classification"

    def __init__(self, model: nn.Module, processor, settings: RunSettings, device: torch.device | None = None):
        super().__init__(model, processor, settings, device)
        self.data.notes["templates"] = list(settings.data.templates)
        self.classifier = ZeroShotClassifier(model, processor.tokenizer, self.data.class_names, settings.data.templates)

    @classmethod
    def load_model(cls, name_or_path: str, dtype: torch.dtype):
        return load_clip(name_or_path, dtype)

    @staticmethod
    def note(report: dict) -> str:
        images, masked = report["eval_data"], report.get("masked", {})
        return (
            f"Accuracy of CLIP's zero-shot head (prompts {images['templates']}) on {images['heldout_images']} "
            f"held-out images ({images['heldout']}), {images['classes']} classes; the dense row is the zero-shot "
            f"model, the other is tuned on {images['train_images']} images. Masked: "
            f"{masked.get('targeted', 0):.2%} of the targeted weights, {masked.get('all', 0):.2%} of all parameters."
        )

    @property
    def image_processor(self):
        return self.processor.image_processor

    @property
    def module(self) -> nn.Module:
        return self.classifier

    def use_model(self, model: nn.Module) -> None:
        self.model = self.classifier.clip = model

    def measure(self, label: str) -> dict:
        """Accuracy on the held-out split and CLIP's parameters."""
        start = time.perf_counter()
        self.classifier.eval()
        params = count_params(self.model)
        return {
            "accuracy": self.heldout_accuracy(),
            "params": {"total": params.total, "nonzero": params.nonzero},
            "seconds": time.perf_counter() - start,
        }

    def fields(self) -> dict:
        """The task, what the masks removed (of the targeted weights, of all parameters), the data's notes."""
        return {"task": self.name, "masked": masked_fractions(self.model), "eval_data": self.data.notes}
