"""The Task seam: the registry, method x task pairs refused at validation, one pipeline flow for a causal LM, CLIP
and an image classifier (complete run directories), gating a CNN from a recipe, and the resnet-digits alias."""

from __future__ import annotations

import json
import typing

import pytest
import torch
from transformers import AutoModelForImageClassification

from prune.cli import main
from prune.core.errors import UserInputError
from prune.data.images import ImageDataConfig, stratified_split
from prune.data.text import DataConfig
from prune.methods.gating.layers import gated_layers
from prune.methods.registry import METHODS
from prune.models import image_classifier
from prune.models.loading import list_models
from prune.runs.export import export_run
from prune.runs.loading import load_model
from prune.runs.pipeline import run
from prune.runs.recipe import Recipe, parse_recipe
from prune.tasks.classification import classifier_accuracy
from prune.tasks.data_config import DATA_CONFIGS, ZeroShotDataConfig
from prune.tasks.image_classification import ImageClassification, head_indices
from prune.tasks.registry import TASKS, get_task
from tests.conftest import docs_text, save_tiny_model, save_tiny_resnet

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ registry


def test_the_registry_names_every_task_the_recipe_accepts_and_their_data_sections():
    assert list(TASKS) == list(typing.get_args(Recipe.model_fields["task"].annotation))
    assert all(task.name == name for name, task in TASKS.items())
    assert DATA_CONFIGS == {
        "causal-lm": DataConfig,
        "zero-shot-classification": ZeroShotDataConfig,
        "image-classification": ImageDataConfig,
    }
    assert {name: task.metric for name, task in TASKS.items()} == {
        "causal-lm": "perplexity",
        "zero-shot-classification": "error",
        "image-classification": "error",
    }
    with pytest.raises(UserInputError, match="unknown task 'audio'; available tasks: causal-lm, "):
        get_task("audio")


def test_every_method_declares_tasks_that_exist():
    for spec in METHODS.values():
        assert spec.tasks and spec.tasks <= set(TASKS), spec.name
    assert METHODS["gating"].tasks == {"causal-lm", "image-classification"}
    assert METHODS["binary"].tasks == {"zero-shot-classification", "image-classification"}


def test_an_unsupported_method_task_pair_is_refused_when_the_recipe_is_validated(tmp_path, capsys):
    with pytest.raises(
        UserInputError,
        match=r"method 'wanda' does not support task 'image-classification'; it "
        r"supports causal-lm\. For image-classification, use one of: binary, gating",
    ):
        parse_recipe({"task": "image-classification", "method": {"name": "wanda"}})
    recipe = tmp_path / "vib-on-clip.yaml"
    recipe.write_text(f"task: zero-shot-classification\nmethod: {{name: vib}}\noutput: {tmp_path / 'run'}\n")
    assert main(["run", str(recipe)]) == 2
    assert "does not support task 'zero-shot-classification'; it supports causal-lm" in " ".join(
        capsys.readouterr().err.split()
    )
    assert not (tmp_path / "run").exists()


def test_the_data_section_follows_the_task():
    with pytest.raises(UserInputError, match=r"unknown key 'data.templates'"):  # prompts are CLIP's alone
        parse_recipe({"task": "image-classification", "data": {"templates": ["{}."]}, "method": {"name": "gating"}})
    recipe = parse_recipe({"task": "zero-shot-classification", "method": {"name": "binary"}})
    assert (recipe.data.shots, recipe.data.templates) == (16, ["a photo of a {}."])
    assert parse_recipe({"task": "image-classification", "method": {"name": "gating"}}).data.shots is None


def test_head_indices_match_classes_by_name_in_any_order():
    head = {0: "cat", 1: "Red_Fox", 2: "dog"}
    assert head_indices(["dog", "red fox", "cat"], head).tolist() == [2, 1, 0]
    assert head_indices(["a", "b"], {0: "LABEL_0", 1: "LABEL_1"}).tolist() == [0, 1]
    with pytest.raises(UserInputError, match="do not include the dataset's bird; use a classifier fine-tuned"):
        head_indices(["cat", "bird"], head)


# ---------------------------------------------------------------------------------------------- one flow


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    """A tiny HF ResNet for the ten digits, saved like a real checkpoint."""
    return save_tiny_resnet(tmp_path_factory.mktemp("resnet") / "tiny")


def digits_recipe(model_dir, output, method: dict, task="image-classification", steps=4, **data) -> Recipe:
    return parse_recipe(
        {
            "model": str(model_dir),
            "task": task,
            "data": {"source": "digits", "shots": 4, **data},
            "method": method,
            "train": {"steps": steps, "batch_size": 8, "lr": 0.01, "log_every": 2, "eval_every": 2},
            "eval": {"limit": 40},
            "output": str(output),
        }
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text(docs_text())
    return path


@pytest.mark.parametrize("task", ["causal-lm", "zero-shot-classification", "image-classification"])
def test_one_flow_writes_a_complete_run_directory_for_every_task(task, tmp_path, corpus, clip_dir, resnet_dir):
    output = tmp_path / "run"
    if task == "causal-lm":
        recipe = parse_recipe(
            {
                "model": str(save_tiny_model(tmp_path / "tiny")),
                "data": {"source": str(corpus), "seq_len": 32},
                "method": {"name": "magnitude", "sparsity": 0.5},
                "eval": {"tasks": [], "latency": False},
                "output": str(output),
            }
        )
    elif task == "zero-shot-classification":
        recipe = digits_recipe(clip_dir, output, {"name": "binary", "gradient_dropout": 0.0}, task, templates=["{}."])
    else:  # the convolutions' weights masked: a plain ResNet checkpoint comes out
        recipe = digits_recipe(
            resnet_dir,
            output,
            {"name": "binary", "targets": ["*convolution"], "init_score": 0.0051, "gradient_dropout": 0.0},
        )
    report = run(recipe)
    assert json.loads((output / "report.json").read_text()) == json.loads(json.dumps(report))
    for name in ("report.md", "recipe.yaml", "masks.safetensors", "masks.json", "model/config.json"):
        assert (output / name).is_file(), name
    assert {"load", "dense_eval", "prune", "pruned_eval", "save_model"} <= set(report["timings"])
    assert report["params"]["total"] == report["dense"]["params"]["total"]
    if task == "causal-lm":
        assert "task" not in report and report["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)
        assert report["perplexity"]["dense"] == report["dense"]["perplexity"]["value"]
        assert "tokens of the test part" in (output / "report.md").read_text()
        return
    assert report["task"] == task and report["train"]["steps"] == 4 and 0 <= report["train"]["best_eval_error"] <= 1
    assert report["eval_data"]["train_images"] == 40 and report["eval_data"]["heldout_images"] == 40
    assert (output / "train_curve.png").is_file()
    if task == "zero-shot-classification":
        assert report["masked"]["targeted"] == report["sparsity"]["achieved"]
        assert "CLIP's zero-shot head" in (output / "report.md").read_text()
        return
    assert 0 < report["sparsity"]["achieved"] < 1 and "masked" not in report
    assert report["flops"]["pruned"] < report["flops"]["dense"] == report["dense"]["flops"]["dense"]
    assert "the model's own classification head on 40 held-out images" in (output / "report.md").read_text()
    # model/ is a plain transformers image classifier that reproduces the pruned accuracy
    model, processor = load_model(str(output / "model"), task=task)
    assert (
        type(AutoModelForImageClassification.from_pretrained(output / "model")).__name__
        == "ResNetForImageClassification"
    )
    task_again = ImageClassification(model, processor, recipe)
    assert classifier_accuracy(model, task_again.data.heldout, limit=40) == pytest.approx(report["accuracy"]["digits"])


def test_gating_a_cnn_runs_from_a_recipe_and_the_run_dir_restores_it(tmp_path, resnet_dir):
    output = tmp_path / "run"
    recipe = digits_recipe(
        resnet_dir, output, {"name": "gating", "threshold": 0.8, "mode": "joint", "init_bias": 0.5}, steps=6
    )
    report = run(recipe)
    assert (output / "predictors.safetensors").is_file() and not (output / "model").exists()
    gating, flops = report["gating"], report["flops"]
    assert gating["images"] == gating["inputs"] == 40
    per_image = gating["flops_per_input"]
    assert per_image["dense"] == flops["dense"] == report["dense"]["flops"]["dense"]  # every conv is gated
    assert flops["pruned"] == round(per_image["gated"]) and per_image["gated"] > per_image["predictors"] > 0
    assert report["sparsity"]["achieved"] == pytest.approx(1 - gating["keep_fraction"])
    model, processor = load_model(str(output))  # the run's own task, from its recipe
    assert len(gated_layers(model)) == 6
    task = ImageClassification(model, processor, recipe)
    assert classifier_accuracy(model, task.data.heldout, limit=40) == pytest.approx(report["accuracy"]["digits"])
    with pytest.raises(UserInputError, match="no plain-checkpoint form"):
        export_run(output)


# ---------------------------------------------------------------------------------------------- the alias


def test_resnet_digits_is_trained_once_on_the_train_part_and_listed(tmp_path, monkeypatch):
    """A narrow, one-epoch variant (the real one trains for about a minute)."""
    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(image_classifier, "STEM", 4)
    monkeypatch.setattr(image_classifier, "WIDTHS", (4, 8, 8))
    monkeypatch.setattr(image_classifier, "DEPTHS", (1, 1, 1))
    monkeypatch.setattr(image_classifier, "EPOCHS", 1)
    trained = []
    original = image_classifier.train_classifier
    monkeypatch.setattr(
        image_classifier,
        "train_classifier",
        lambda model, images, labels, **kw: trained.append(labels) or original(model, images, labels, **kw),
    )
    model, processor = load_model("resnet-digits", task="image-classification")
    again, _ = load_model("resnet-digits", task="image-classification")
    assert len(trained) == 1  # the second load read the cache
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert model.config.hidden_sizes == [4, 8, 8] and processor.size == {"height": 32, "width": 32}
    listed = {row["name"]: row["path"] for row in list_models()}
    assert listed["resnet-digits"] == str(tmp_path / "models" / "resnet-digits")

    # it trained on exactly the images the default recipe does not hold out
    settings = parse_recipe({"model": "resnet-digits", "task": "image-classification", "method": {"name": "gating"}})
    task = ImageClassification(model, processor, settings)
    labels = task.data.train.labels
    train, heldout = stratified_split(_digit_labels(), 0.2, seed=0)
    assert (len(trained[0]), len(task.data.heldout)) == (len(train), len(heldout))
    assert torch.equal(trained[0], labels) and task.data.train.indices == train and task.data.heldout.indices == heldout

    with pytest.raises(UserInputError, match="held-out images would include ones it trained on"):
        ImageClassification(model, processor, parse_recipe({**settings.to_dict(), "seed": 1}))
    with pytest.raises(UserInputError, match="use it with `task: image-classification`"):
        load_model("resnet-digits")


def _digit_labels() -> list[int]:
    from sklearn.datasets import load_digits

    return load_digits().target.tolist()
