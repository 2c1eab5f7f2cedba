"""Image data (digits, image folders, class-name columns, k-shot sampling), the CLIP zero-shot head, the offline
tiny CLIP, and the zero-shot-classification pipeline end to end: mask tuning lifts a random CLIP from chance
to >= 80% on held-out digits."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from prune.cli import main
from prune.core.errors import UserInputError
from prune.data.images import (
    DIGIT_NAMES,
    ImageDataConfig,
    columns_and_classes,
    digits_table,
    few_shot,
    load_image_data,
    stratified_split,
)
from prune.methods.binary.method import BinaryConfig, attach_binary
from prune.models.clip import TINY_CLIP, load_clip
from prune.models.loading import list_models
from prune.runs.recipe import load_recipe, parse_recipe
from prune.tasks.classification import classifier_accuracy
from prune.tasks.zero_shot import ZeroShotClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------ data


def test_few_shot_draws_k_per_class_seeded_from_the_pool():
    labels = [0] * 10 + [1] * 7 + [2] * 12
    pool = list(range(0, 29, 1))[2:]  # the first two images are held out
    picked = few_shot(labels, pool, 4, seed=3, class_names=["a", "b", "c"])
    assert sorted(labels[i] for i in picked) == [0] * 4 + [1] * 4 + [2] * 4
    assert set(picked) <= set(pool)
    assert picked == few_shot(labels, pool, 4, seed=3, class_names=["a", "b", "c"])
    assert picked != few_shot(labels, pool, 4, seed=4, class_names=["a", "b", "c"])


def test_k_larger_than_the_smallest_class_is_refused():
    labels = [0] * 10 + [1] * 7
    with pytest.raises(UserInputError, match=r"class 'b' has only 7 training images; set data.shots to at most 7"):
        few_shot(labels, list(range(17)), 8, seed=0, class_names=["a", "b"])


def test_stratified_split_holds_out_a_share_of_every_class_and_never_overlaps():
    labels = [0] * 10 + [1] * 20 + [2] * 5
    train, heldout = stratified_split(labels, 0.2, seed=0)
    assert not set(train) & set(heldout) and sorted(train + heldout) == list(range(len(labels)))
    assert [sum(labels[i] == c for i in heldout) for c in range(3)] == [2, 4, 1]
    assert (train, heldout) == stratified_split(labels, 0.2, seed=0)


def test_digits_is_a_real_image_dataset():
    table = digits_table()
    assert len(table) == 1797 and table.features["label"].names == DIGIT_NAMES
    image = table[0]["image"]
    assert image.size == (8, 8) and np.asarray(image).max() > 200


def table_with(columns: dict, features: dict | None = None):
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features) if features else None)


def test_a_column_of_class_names_gives_labels_and_names():
    images = [Image.new("RGB", (4, 4))] * 3
    table = table_with(
        {"image": images, "species": ["dog", "cat", "dog"]},
        {"image": datasets.Image(), "species": datasets.Value("string")},
    )
    column, labels, names = columns_and_classes(table, ImageDataConfig(label_column="species"), "pets")
    assert (column, labels, names) == ("image", [1, 0, 1], ["cat", "dog"])


def test_a_dataset_without_a_label_column_names_the_columns_it_has():
    table = table_with(
        {"image": [Image.new("RGB", (4, 4))], "caption": ["x"]},
        {"image": datasets.Image(), "caption": datasets.Value("string")},
    )
    with pytest.raises(
        UserInputError,
        match=r"no label or class-name column; the columns found are: image \(Image\), "
        r"caption \(Value\)",
    ):
        columns_and_classes(table, ImageDataConfig(), "captions")


def test_integer_labels_need_class_names():
    table = table_with(
        {"image": [Image.new("RGB", (4, 4))] * 2, "label": [0, 1]},
        {"image": datasets.Image(), "label": datasets.Value("int64")},
    )
    with pytest.raises(UserInputError, match="data.class_names"):
        columns_and_classes(table, ImageDataConfig(), "ints")
    assert columns_and_classes(table, ImageDataConfig(class_names=["no", "yes"]), "ints")[2] == ["no", "yes"]


def write_folder(root, splits=("train", "test")):
    for split in splits:
        for name, shade in (("red_fox", (200, 30, 30)), ("snow", (240, 240, 240))):
            (root / split / name).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (12, 12), tuple(min(255, c + i) for c in shade)).save(root / split / name / f"{i}.png")
    return root


def test_local_image_folder_with_train_and_test(tmp_path, clip_dir):
    _, processor = load_clip(str(clip_dir))
    config = ImageDataConfig(source=str(write_folder(tmp_path / "folder")), shots=2)
    data = load_image_data(config, processor.image_processor, seed=0)
    assert data.class_names == ["red fox", "snow"]
    assert (len(data.train), len(data.heldout)) == (4, 12) and data.notes["heldout"] == "test"
    row = data.train[0]
    assert row["pixel_values"].shape == (3, 32, 32) and row["labels"].dtype == torch.long


def test_image_folder_without_test_split_holds_out_a_share(tmp_path, clip_dir):
    _, processor = load_clip(str(clip_dir))
    config = ImageDataConfig(
        source=str(write_folder(tmp_path / "folder", ("train",))), shots=None, heldout_fraction=0.5
    )
    data = load_image_data(config, processor.image_processor, seed=0)
    assert (len(data.train), len(data.heldout)) == (6, 6)
    assert not set(data.train.indices) & set(data.heldout.indices)


def test_hub_dataset_with_a_class_name_column_and_its_test_split(monkeypatch, clip_dir):
    """The Hub branch with the Hub replaced by in-memory tables: split names asked first, only the needed splits
    loaded, a string class-name column turned into labels."""
    from prune.data import images as vision

    def table(count):
        return table_with(
            {
                "img": [Image.new("RGB", (6, 6), (i * 20, 0, 0)) for i in range(count)],
                "breed": ["pug", "corgi"] * (count // 2),
            },
            {"img": datasets.Image(), "breed": datasets.Value("string")},
        )

    loaded = []
    monkeypatch.setattr(vision.hub, "require_hub", lambda *args: None)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, config: ["train", "validation", "test"])
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda name, config, split: loaded.append(split) or table(8 if split == "train" else 4),
    )
    _, processor = load_clip(str(clip_dir))
    data = load_image_data(
        ImageDataConfig(source="someone/dogs", label_column="breed", shots=3), processor.image_processor, 0
    )
    assert loaded == ["train", "test"] and data.class_names == ["corgi", "pug"]
    assert (len(data.train), len(data.heldout), data.notes["heldout"]) == (6, 4, "test")
    with pytest.raises(UserInputError, match=r"no split 'dev'; its splits are \['train', 'validation', 'test'\]"):
        load_image_data(ImageDataConfig(source="someone/dogs", heldout_split="dev"), processor.image_processor, 0)


def test_missing_folder_and_unreachable_hub_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(UserInputError, match="no such image folder"):
        load_image_data(ImageDataConfig(source=str(tmp_path / "nope")), None, 0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="needs the Hugging Face Hub"):
        load_image_data(ImageDataConfig(source="uoft-cs/cifar10"), None, 0)


# ---------------------------------------------------------------------------------------------- classifier


def test_zero_shot_logits_are_logit_scale_times_cosine(clip_dir):
    clip, processor = load_clip(str(clip_dir))
    names = ["cat", "dog", "bird"]
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = ZeroShotClassifier(clip, processor.tokenizer, names, ["a photo of a {}."])
    tokens = processor.tokenizer([f"a photo of a {name}." for name in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = clip(pixel_values=pixels, **tokens).logits_per_image
        assert torch.allclose(model(pixels).logits, expected, atol=1e-5)
        assert model(pixels).logits.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_class_embeddings_follow_masks_on_the_text_tower(clip_dir):
    clip, processor = load_clip(str(clip_dir))
    model = ZeroShotClassifier(clip, processor.tokenizer, ["cat", "dog"], ["{}."])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(pixels).logits  # caches the class embeddings of the frozen text tower
        objective = attach_binary(clip, BinaryConfig(targets=["*text_model.encoder.layers.*.self_attn.*_proj"]))
        for mask in objective.masks:
            mask.scores.view(-1)[::2] = 0.0  # mask half of the text attention weights
        model.eval()
        assert not torch.allclose(model(pixels).logits, before)


# -------------------------------------------------------------------------------------------- tiny CLIP alias


def test_tiny_clip_alias_is_built_once_deterministically_and_listed(tmp_path, monkeypatch, clip_dir):
    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path))
    clip, processor = load_clip(TINY_CLIP)
    reference, _ = load_clip(str(clip_dir))
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), reference.state_dict().values()))
    assert processor.tokenizer("a photo of a 3.")["input_ids"][-1] == clip.config.text_config.eos_token_id
    listed = {row["name"]: row["path"] for row in list_models()}
    assert listed[TINY_CLIP] == str(tmp_path / "models" / TINY_CLIP)


def test_clip_and_task_mismatches_are_clear(clip_dir, monkeypatch):
    from prune.runs.loading import load_model

    with pytest.raises(UserInputError, match="task: zero-shot-classification"):
        load_model(TINY_CLIP)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="clip-tiny-random"):
        load_model("openai/clip-vit-base-patch16", task="zero-shot-classification")
    recipe = load_recipe("recipes/clip/vit-b16-16shot.yaml")
    assert (recipe.model, recipe.data.shots, recipe.train.lr) == ("openai/clip-vit-base-patch16", 16, 8e-5)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_digits_recipe_lifts_a_random_clip_from_chance_to_80_percent(tmp_path, monkeypatch, capsys):
    """`prune run recipes/clip/digits-offline.yaml`, shortened to fit a test: 540 steps (12 epochs) and plain
    straight-through scores (gradient dropout doubles the cost of a step; its math is tested in test_binary)."""
    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "run"
    main(
        [
            "run",
            "recipes/clip/digits-offline.yaml",
            "--output",
            str(output),
            "--set",
            "train.steps=540",
            "--set",
            "method.gradient_dropout=0",
        ]
    )
    report = json.loads((output / "report.json").read_text())
    assert report["dense"]["accuracy"]["digits"] < 0.2  # the frozen random model sits at chance
    assert report["accuracy"]["digits"] >= 0.8
    assert report["task"] == "zero-shot-classification" and report["sparsity"]["target"] == "mask tuning"
    assert 0.0 < report["masked"]["all"] < report["masked"]["targeted"] == report["sparsity"]["achieved"] < 1.0
    assert report["params"]["nonzero"] < report["params"]["total"] == report["dense"]["params"]["total"]
    assert report["train"]["steps"] == 540 and {"load", "dense_eval", "train", "pruned_eval"} <= set(report["timings"])
    assert "digits" in capsys.readouterr().out
    assert "held-out images" in (output / "report.md").read_text()
    for name in ("masks.safetensors", "masks.json", "recipe.yaml", "model/config.json", "model/processor_config.json"):
        assert (output / name).exists()
    # model/ is a plain CLIP checkpoint reproducing the tuned accuracy
    recipe = load_recipe(output / "recipe.yaml")  # the resolved recipe parses again
    _, processor = load_clip(str(output / "model"))
    data = load_image_data(recipe.data, processor.image_processor, recipe.seed)
    tuned = ZeroShotClassifier(
        CLIPModel.from_pretrained(output / "model").eval(), processor.tokenizer, data.class_names, recipe.data.templates
    )
    assert classifier_accuracy(tuned, data.heldout) == pytest.approx(report["accuracy"]["digits"])


def test_gradient_dropout_runs_in_the_pipeline(tmp_path, clip_dir):
    recipe = parse_recipe(
        {
            "model": str(clip_dir),
            "task": "zero-shot-classification",
            "data": {"source": "digits", "shots": 4, "templates": ["{}."]},
            "method": {"name": "binary", "gradient_dropout": 0.3},
            "train": {"steps": 6, "batch_size": 8, "lr": 0.005, "log_every": 3, "eval_every": 3},
            "eval": {"limit": 50},
            "output": str(tmp_path / "run"),
        }
    )
    from prune.runs.pipeline import run

    report = run(recipe)
    assert report["train"]["steps"] == 6 and report["train"]["best_eval_error"] is not None
    log = [json.loads(line) for line in (tmp_path / "run" / "train" / "train_log.jsonl").read_text().splitlines()]
    steps = [record for record in log if "loss" in record]
    assert [record["step"] for record in steps] == [3, 6] and steps[-1]["samples_per_s"] > 0
    assert [record["step"] for record in log if "eval_error" in record] == [0, 3, 6]
    assert (tmp_path / "run" / "train_curve.png").stat().st_size > 0
    assert report["eval_data"]["train_images"] == 40 and report["eval_data"]["heldout_images"] == 50
    # `prune export` rebuilds model/ from the base CLIP + masks.safetensors, weight for weight
    from safetensors.torch import load_file

    from prune.runs.export import export_run

    written = load_file(tmp_path / "run" / "model" / "model.safetensors")
    export_run(tmp_path / "run")
    rebuilt = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert written.keys() == rebuilt.keys() and all(torch.equal(written[k], rebuilt[k]) for k in written)
