"""Image classification data: sources, splits and k-shot sampling.

Data comes through `datasets`: a Hub dataset (its label column a ClassLabel, or a column of class names), a
local image folder (`imagefolder`: one sub-directory per class, optional train/test folders), or `digits`:
scikit-learn's 1797 handwritten digits (8x8, shipped inside its PyPI package, so always offline), which the
model's image processor upscales to its input size. The held-out split is the dataset's own test split when it
has one, else a seeded, per-class share of the train split; the two never overlap. Training uses k images per
class (`shots`, seeded) from the train part.

"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from prune.core import hub
from prune.core.errors import UserInputError
from prune.core.extras import require
from prune.data.config import DIGITS, ImageDataConfig

DIGIT_NAMES = [str(digit) for digit in range(10)]
_LABEL_COLUMNS = ("label", "labels", "class", "class_name", "fine_label", "target")
_IMAGE_COLUMNS = ("image", "img", "picture")
_MATERIALIZE_BYTES = 1 << 30  # preprocess a split once when its pixels fit in 1 GiB; else per batch


# ------------------------------------------------------------------------------------------------ datasets


def load_tables(config: ImageDataConfig):
    """(train table, held-out table or None) as `datasets.Dataset`s."""
    import datasets

    source = config.source
    if source == DIGITS:
        return digits_table(), None
    path = Path(source).expanduser()
    if path.exists() or not hub.looks_like_hub_id(source):
        if not path.is_dir():
            raise UserInputError(
                f"no such image folder {source!r}; pass a directory with one sub-directory per class (optionally "
                f"under train/ and test/), a Hub dataset name, or `{DIGITS}`."
            )
        splits = _load(lambda: datasets.load_dataset("imagefolder", data_dir=str(path)), source)
        return _pick_splits(splits, config, source)
    hub.require_hub(f"the dataset {source!r}", f"pass a local image folder or `{DIGITS}`")
    names = _load(lambda: datasets.get_dataset_split_names(source, config.config), source)
    heldout = config.heldout_split or ("test" if "test" in names else None)
    for key, split in (("split", config.split), ("heldout_split", heldout)):
        if split is not None and split not in names:
            raise UserInputError(f"{source} has no split {split!r}; its splits are {names}. Set data.{key}.")
    loaded = {
        split: _load(lambda split=split: datasets.load_dataset(source, config.config, split=split), source)
        for split in dict.fromkeys([config.split, heldout])
        if split is not None
    }
    return _pick_splits(loaded, config, source)


def _load(thunk, source: str):
    import datasets

    try:
        return thunk()
    except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:
        raise UserInputError(
            f"could not load the image dataset {source!r}: {err}; check the name, config and split."
        ) from err


def _pick_splits(splits, config: ImageDataConfig, source: str):
    names = list(splits)
    if config.split not in splits:
        raise UserInputError(f"{source} has no split {config.split!r}; its splits are {names}. Set data.split.")
    heldout = config.heldout_split or ("test" if "test" in splits else None)
    if heldout is not None and heldout not in splits:
        raise UserInputError(f"{source} has no split {heldout!r}; its splits are {names}. Set data.heldout_split.")
    return splits[config.split], (splits[heldout] if heldout else None)


def digits_table():
    """scikit-learn's handwritten digits as an image dataset (8x8 grayscale, labels 0-9)."""
    require("sklearn", "the digits images (data.source: digits, and the resnet-digits alias trained on them)")
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)) for image in digits.images]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES)})
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


def columns_and_classes(table, config: ImageDataConfig, source: str) -> tuple[str, list[int], list[str]]:
    """(image column, integer labels, class names): from a ClassLabel column, or a column of class names."""
    import datasets

    features = table.features
    found = ", ".join(f"{name} ({type(feature).__name__})" for name, feature in features.items())
    image_column = config.image_column or next(
        (name for name, feature in features.items() if isinstance(feature, datasets.Image)),
        next((name for name in _IMAGE_COLUMNS if name in features), None),
    )
    label_column = config.label_column or next(
        (name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)),
        next((name for name in _LABEL_COLUMNS if name in features), None),
    )
    for kind, column in (("image", image_column), ("label or class-name", label_column)):
        if column is None or column not in features:
            raise UserInputError(
                f"{source} has no {kind} column{f' {column!r}' if column else ''}; the columns found are: {found}. "
                f"Set data.{'image' if kind == 'image' else 'label'}_column."
            )
    values = table[label_column]
    feature = features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        labels, names = list(values), list(feature.names)
    elif values and all(isinstance(value, str) for value in values):
        names = sorted(set(values))
        index = {name: position for position, name in enumerate(names)}
        labels = [index[value] for value in values]
    elif config.class_names is not None:
        labels, names = [int(value) for value in values], list(config.class_names)
    else:
        raise UserInputError(
            f"{source}'s column {label_column!r} holds integer labels without class names (not a ClassLabel); "
            "list them in data.class_names, or set data.label_column to a column of class names."
        )
    if config.class_names is not None:
        if len(config.class_names) != len(names) or max(labels) >= len(config.class_names):
            raise UserInputError(
                f"data.class_names lists {len(config.class_names)} names, but {source} has {len(names)} classes."
            )
        names = list(config.class_names)
    return image_column, labels, [name.replace("_", " ") for name in names]


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded `fraction` of every class held out, at least one image each."""
    generator = torch.Generator().manual_seed(seed)
    train, heldout = [], []
    for members in _by_class(labels).values():
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        heldout += order[:count]
        train += order[count:]
    return sorted(train), sorted(heldout)


def few_shot(labels: list[int], indices: list[int], shots: int, seed: int, class_names: list[str]) -> list[int]:
    """k = `shots` indices per class from `indices`, drawn with a generator seeded by `seed`."""
    by_class = _by_class([labels[i] for i in indices])
    smallest = min(by_class.items(), key=lambda item: len(item[1]))
    if shots > len(smallest[1]):
        raise UserInputError(
            f"data.shots={shots} images per class were asked for, but class {class_names[smallest[0]]!r} has only "
            f"{len(smallest[1])} training images; set data.shots to at most {len(smallest[1])} (or null for all)."
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for members in by_class.values():
        chosen += [indices[members[i]] for i in torch.randperm(len(members), generator=generator)[:shots].tolist()]
    return sorted(chosen)


def _by_class(labels: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        groups.setdefault(int(label), []).append(position)
    return dict(sorted(groups.items()))


class ImageRows(torch.utils.data.Dataset):
    """Rows {"pixel_values": [3, H, W], "labels": int} of a table, preprocessed by the model's image processor;
    small splits are preprocessed once, large ones per access."""

    def __init__(self, table, image_column: str, labels: list[int], indices: list[int], image_processor):
        self.table, self.image_column, self.image_processor = table, image_column, image_processor
        self.indices = list(indices)
        self.labels = torch.tensor([labels[i] for i in self.indices], dtype=torch.long)
        self.pixels: Tensor | None = None
        if len(self.indices):
            first = self._preprocess([0])
            if first.numel() * first.element_size() * len(self.indices) <= _MATERIALIZE_BYTES:
                self.pixels = torch.cat(
                    [self._preprocess(range(start, min(start + 256, len(self)))) for start in range(0, len(self), 256)]
                )

    def __len__(self) -> int:
        return len(self.indices)

    def _preprocess(self, positions) -> Tensor:
        images = self.table[[self.indices[p] for p in positions]][self.image_column]
        return self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")[
            "pixel_values"
        ]

    def pixel_values(self, positions: list[int]) -> Tensor:
        """[len(positions), 3, H, W], preprocessed in one call when not already."""
        return self.pixels[positions] if self.pixels is not None else self._preprocess(positions)

    def __getitem__(self, position: int) -> dict[str, Tensor]:
        return {"pixel_values": self.pixel_values([position])[0], "labels": self.labels[position]}


@dataclass
class ImageData:
    """What an image task trains and evaluates on."""

    train: ImageRows
    heldout: ImageRows
    class_names: list[str]
    name: str
    notes: dict = field(default_factory=dict)


def load_image_data(config: ImageDataConfig, image_processor, seed: int) -> ImageData:
    """Load the source, split it (test split or a seeded per-class share), draw the k-shot training set."""
    train_table, heldout_table = load_tables(config)
    image_column, labels, class_names = columns_and_classes(train_table, config, config.source)
    if heldout_table is None:
        pool, heldout_indices = stratified_split(labels, config.heldout_fraction, seed)
        heldout_table, heldout_labels = train_table, labels
        held_from = f"{config.heldout_fraction:.0%} of {config.split} per class (seed {seed})"
    else:
        pool = list(range(len(labels)))
        _, heldout_labels, heldout_names = columns_and_classes(heldout_table, config, config.source)
        if heldout_names != class_names:
            raise UserInputError(f"{config.source}'s held-out split has other classes than {config.split}.")
        heldout_indices = list(range(len(heldout_labels)))
        held_from = config.heldout_split or "test"
    chosen = few_shot(labels, pool, config.shots, seed, class_names) if config.shots else pool
    name = config.source.rstrip("/").split("/")[-1]
    return ImageData(
        train=ImageRows(train_table, image_column, labels, chosen, image_processor),
        heldout=ImageRows(heldout_table, image_column, heldout_labels, heldout_indices, image_processor),
        class_names=class_names,
        name=name,
        notes={
            "train_images": len(chosen),
            "heldout_images": len(heldout_indices),
            "classes": len(class_names),
            "shots": config.shots,
            "heldout": held_from,
        },
    )


# ------------------------------------------------------------------------------------------- classifier
