"""A small ResNet on a real image dataset that ships inside a PyPI package: scikit-learn's handwritten digits
(1797 grayscale 8x8 images, 10 classes; no download). It gives dynamic gating a CNN to prune on a CPU in
minutes; HF ResNet models (`transformers.ResNetForImageClassification`) gate through the same wrappers.

The digits ResNet is built from Conv2d+BN(+ReLU) blocks in `nn.Sequential`s, the structure the gating
wrappers recognize: a stem, then stages of basic blocks (conv-BN-ReLU, conv-BN, plus a 1x1 conv-BN shortcut
where the shape changes), global average pooling and a linear classifier.

The mask trainer (prune.training.trainer) takes any indexable dataset: `TensorDataset(images, labels)` rows collate
into the (images, labels) batch `classification_loss` takes, so images train through the same trainer as text.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

IMAGE_SHAPE = (1, 8, 8)
CLASSES = 10


@dataclass
class ImageSplits:
    train_x: Tensor  # [N, 1, 8, 8], standardized with the training split's mean and std
    train_y: Tensor  # [N] int64
    test_x: Tensor
    test_y: Tensor


def digits_splits(test_fraction: float = 0.25, seed: int = 0) -> ImageSplits:
    """scikit-learn's digits, split by a seeded permutation (the test split never trains anything)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(round(len(labels) * (1 - test_fraction)))
    train, test = order[:cut], order[cut:]
    mean, std = images[train].mean(), images[train].std()
    return ImageSplits((images[train] - mean) / std, labels[train], (images[test] - mean) / std, labels[test])


def conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride)
        self.conv2 = conv_bn(cout, cout, relu=False)
        self.shortcut = conv_bn(cin, cout, stride, kernel=1, relu=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """stem (1->w) + stages of `blocks` basic blocks at widths w, 2w, 4w (8x8 -> 4x4 -> 2x2) + linear head."""

    def __init__(self, width: int = 16, blocks: int = 2, classes: int = CLASSES):
        super().__init__()
        self.stem = conv_bn(IMAGE_SHAPE[0], width)
        stages, cin = [], width
        for index, cout in enumerate((width, 2 * width, 4 * width)):
            stages += [BasicBlock(cin if i == 0 else cout, cout, 2 if (i == 0 and index > 0) else 1) for i in range(blocks)]
            cin = cout
        self.blocks = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 30, lr: float = 3e-3,
                     batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Plain supervised training of the dense CNN (AdamW, cosine decay, random 1-pixel shifts)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            rows = order[start:start + batch_size]
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            images = torch.roll(x[rows], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(images), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def classifier_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The trainer's task loss for an (images, labels) batch: cross-entropy of the logits."""
    images, labels = batch
    logits = model(images)
    logits = getattr(logits, "logits", logits)  # HF image classifiers return an output object
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def conv_flops(model: nn.Module, x: Tensor) -> int:
    """Dense FLOPs per image of every Conv2d (2 per MAC), from the output shapes of one forward."""
    total = 0

    def hook(module: nn.Conv2d, inputs, out: Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1]
        total += 2 * module.out_channels * (module.in_channels // module.groups) * kernel * out.shape[2] * out.shape[3]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        model.eval()
        model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return total
