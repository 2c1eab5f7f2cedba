"""The contracts every registered method keeps, proved once for all of them (like peft's testing_common).

One table, ROWS: a method, the model families it supports, tiny config overrides, and one bad value. Every
(method, family) case runs the same tests: only mask parameters train; `unwrap` gives back the original
modules; the evaluated (hard-mask) model computes what its export computes; saved masks restore to
identical logits; a short `prune run` writes a complete run directory; a bad config is a clear error.
Each goes through the method's registered hooks (prune.methods.spec.MethodSpec), never a per-method branch.
A new method adds one row; a new model family adds one entry to FAMILIES and its name in the rows it suits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from prune import method_config
from prune.core.errors import UserInputError
from prune.masks.base import hard_masks, mask_parameters, unwrap, wrappers
from prune.methods.registry import METHODS, get_method
from prune.models.clip import make_tiny_clip
from prune.runs.loading import load_model
from prune.runs.pipeline import run
from prune.runs.recipe import load_recipe, parse_recipe
from prune.tasks.classification import classification_loss
from prune.tasks.image_classification import ImageClassification
from prune.tasks.zero_shot import ZeroShotClassification, ZeroShotClassifier
from prune.training.config import TrainConfig
from prune.training.trainer import lm_loss, train
from tests.conftest import docs_text, save_tiny_model, save_tiny_resnet

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS_CHARS = 20_000  # enough text for calibration, two training steps and a held-out perplexity
TRAIN_STEPS = 2


@dataclass(frozen=True)
class Row:
    method: str
    families: tuple[str, ...]
    config: dict  # tiny overrides of the method's defaults
    bad: tuple[dict, str]  # one bad value of the method's config, and words its error must say
    family_config: dict = field(default_factory=dict)  # family name -> overrides for that family only


ROWS = [
    Row("magnitude", ("llama", "gpt2", "clip"), {"sparsity": 0.5}, ({"granularity": "column"}, "granularity")),
    Row("wanda", ("llama", "gpt2"), {"sparsity": "2:4"}, ({"sparsity": "5:4"}, "sparsity")),
    Row("sparsegpt", ("llama", "gpt2"), {"sparsity": 0.5, "blocksize": 16}, ({"dampening": 0}, "dampening")),
    Row(
        "structured",
        ("llama", "gpt2"),
        {"score": "activation", "target": {"params": 0.3}},
        ({"target": {"params": 1.5}}, "strictly between 0 and 1"),
    ),
    Row("depth", ("llama", "gpt2"), {"remove": 1}, ({"remove": 1.5}, "strictly between 0 and 1")),
    Row("nm_gumbel", ("llama", "gpt2"), {"prior": "magnitude"}, ({"sparsity": 0.5}, "nm_gumbel learns N:M masks")),
    Row(
        "vib",
        ("llama", "gpt2"),
        {"target": {"params": 0.3}, "units": {"layers": True}},
        ({"units": {"heads": False, "ffn": False, "hidden": False}}, "at least one unit kind"),
    ),
    Row(
        "binary",
        ("clip", "resnet"),
        {},
        ({"init_score": 0.001}, "must exceed threshold"),
        family_config={"resnet": {"targets": ["*convolution"]}},
    ),  # the default targets are CLIP's
    Row("gating", ("llama", "gpt2", "resnet"), {"threshold": 0.8}, ({"threshold": 1.5}, "threshold")),
    Row("activation", ("llama", "gpt2"), {"sparsity": 0.5}, ({"sparsity": 1.0}, "strictly between 0 and 1")),
]


# -------------------------------------------------------------------------------------------- model families


class CausalLM:
    """A tiny Llama or GPT-2 with a BPE tokenizer, saved like a real checkpoint; text data."""

    task = "causal-lm"
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    blocks = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(2))  # training rows
    calibration = blocks[:4]
    selection = blocks[4:6]  # what a method choosing on validation windows reads (MethodSpec.needs_selection)

    def __init__(self, name: str):
        self.name = name

    def checkpoint(self, directory: Path) -> Path:
        return save_tiny_model(directory, self.name, docs_text(CORPUS_CHARS))

    def data(self, datasets: Path) -> dict:
        return {"source": str(datasets / "docs.txt"), "calibration_samples": 4, "seq_len": 32}

    def eval(self) -> dict:
        return {"tasks": [], "latency": False, "dense_baseline": False, "semi_structured_kernel": False}

    def logits(self, model: nn.Module, processor) -> Tensor:
        return model(input_ids=self.tokens).logits

    def trainee(self, model: nn.Module, processor):
        """(module the trainer drives, its rows, its task loss)."""
        return model, self.blocks, lm_loss


class ZeroShotCLIP:
    """The tiny random CLIP (vision + text towers) as a zero-shot classifier on digits."""

    name, task = "clip", ZeroShotClassification.name
    calibration = None  # no text: methods that calibrate do not support this family
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    classes = ["zero", "one", "two"]

    def checkpoint(self, directory: Path) -> Path:
        make_tiny_clip(directory)
        return directory

    def data(self, datasets: Path) -> dict:
        return {"source": str(datasets / "images"), "shots": 1, "templates": ["{}."]}

    def eval(self) -> dict:
        return {"limit": 20, "dense_baseline": False}

    def classifier(self, model: nn.Module, processor) -> ZeroShotClassifier:
        return ZeroShotClassifier(model, processor.tokenizer, self.classes, ["{}."])

    def logits(self, model: nn.Module, processor) -> Tensor:
        return self.classifier(model, processor)(self.pixels).logits

    def trainee(self, model: nn.Module, processor):
        rows = [{"pixel_values": pixels, "labels": torch.tensor(index % 3)} for index, pixels in enumerate(self.pixels)]
        return self.classifier(model, processor), rows, classification_loss


class ResNetClassifier:
    """A tiny HF ResNet with its own head over the image folder's classes (task image-classification)."""

    name, task = "resnet", ImageClassification.name
    calibration = None
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def checkpoint(self, directory: Path) -> Path:
        return save_tiny_resnet(directory, labels=ZeroShotCLIP.classes)

    def data(self, datasets: Path) -> dict:
        return {"source": str(datasets / "images"), "shots": 1}

    def eval(self) -> dict:
        return {"limit": 20, "dense_baseline": False}

    def logits(self, model: nn.Module, processor) -> Tensor:
        return model(self.pixels).logits

    def trainee(self, model: nn.Module, processor):
        rows = [{"pixel_values": pixels, "labels": torch.tensor(index % 3)} for index, pixels in enumerate(self.pixels)]
        return model, rows, classification_loss


FAMILIES = {family.name: family for family in (CausalLM("llama"), CausalLM("gpt2"), ZeroShotCLIP(), ResNetClassifier())}

CASES = [pytest.param((row, FAMILIES[name]), id=f"{row.method}-{name}") for row in ROWS for name in row.families]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> its tiny checkpoint directory, written on first use."""
    made: dict[str, Path] = {}

    def checkpoint(family) -> Path:
        if family.name not in made:
            made[family.name] = family.checkpoint(tmp_path_factory.mktemp("models") / family.name)
        return made[family.name]

    return checkpoint


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    """docs.txt, and images/{train,test}/<class>/*.png: a 12-image folder loads ~10x faster than digits."""
    root = tmp_path_factory.mktemp("data")
    (root / "docs.txt").write_text(docs_text(CORPUS_CHARS))
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for name in ZeroShotCLIP.classes:
            (root / "images" / split / name).mkdir(parents=True)
            for index in range(2):
                pixels = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(root / "images" / split / name / f"{index}.png")
    return root


@dataclass
class Case:
    """One method on one fresh model of one family."""

    row: Row
    family: object
    directory: Path

    def __post_init__(self):
        self.spec = get_method(self.row.method)
        self.method = {**self.row.config, **self.row.family_config.get(self.family.name, {})}
        self.config = method_config(self.row.method, **self.method)

    def load(self) -> tuple[nn.Module, object]:
        return load_model(str(self.directory), task=self.family.task)

    def attach(self, model: nn.Module):
        calibration = self.family.calibration if self.spec.needs_calibration else None
        options = {"selection": self.family.selection} if self.spec.needs_selection else {}
        return self.spec.attach(model, self.config, calibration, **options)

    @torch.no_grad()
    def logits(self, model: nn.Module, processor) -> Tensor:
        model.eval()  # masks too: their hard, evaluated form
        return self.family.logits(model, processor)


@pytest.fixture
def case(request, checkpoints) -> Case:
    row, family = request.param
    return Case(row, family, checkpoints(family))


def scramble(model: nn.Module) -> None:
    """Random values for every mask parameter, so the hard masks are far from their start (often keep-all)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in mask_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator))


# ----------------------------------------------------------------------------------------------- contracts


def test_every_registered_method_has_a_row():
    assert {row.method for row in ROWS} == set(METHODS)


def test_the_rows_cover_exactly_the_tasks_each_method_declares():
    for row in ROWS:
        assert {FAMILIES[name].task for name in row.families} == METHODS[row.method].tasks, row.method


def test_a_method_declares_a_plain_model_exactly_when_its_spec_needs_no_restore():
    """The recipe refuses recovery (which trains a plain model) by the torch-free declaration; the spec decides."""
    for name, declared in METHODS.items():
        assert declared.plain_model == (get_method(name).restore is None), name


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_only_mask_parameters_train(case, tmp_path):
    """One-shot: nothing trainable is added. Learnable: the masks own every new parameter, and two steps of the
    one trainer move them and nothing else (besides what the objective trains on purpose)."""
    model, processor = case.load()
    before = {id(param): (name, param.detach().clone()) for name, param in model.named_parameters()}
    objective = case.attach(model)
    added = {id(param) for param in model.parameters()} - before.keys()
    if case.spec.kind == "oneshot":
        assert objective is None and not added and mask_parameters(model) == []
        return
    masks = mask_parameters(model)
    assert masks and added == {id(param) for param in masks}
    start = [param.detach().clone() for param in masks]
    trainee, rows, task_loss = case.family.trainee(model, processor)
    train(trainee, objective, rows, TrainConfig(steps=TRAIN_STEPS, batch_size=2, lr=0.1), tmp_path, task_loss=task_loss)
    trained_on_purpose = {id(param) for param in objective.extra_parameters()}
    for param in model.parameters():
        if id(param) in before and id(param) not in trained_on_purpose:
            name, value = before[id(param)]
            assert torch.equal(param, value), f"{name} changed"
    assert any(not torch.equal(param, value) for param, value in zip(masks, start))


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_unwrap_gives_back_the_original_modules(case):
    model, _ = case.load()
    modules = dict(model.named_modules())
    state = {key: value.clone() for key, value in model.state_dict().items()}
    case.attach(model)
    assert wrappers(model)
    unwrap(model)
    assert not wrappers(model)
    after = dict(model.named_modules())
    assert after.keys() == modules.keys() and all(after[name] is modules[name] for name in modules)
    if not case.config.changes_weights:  # else the method rewrote weights on purpose (SparseGPT's update)
        assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_evaluated_forward_equals_the_exported_model(case):
    """The hard-mask model computes what its export computes; a method with no plain-checkpoint form (its masks
    depend on the input) refuses to export instead, and its saved masks restore it (next test)."""
    model, processor = case.load()
    dense = case.logits(model, processor)
    case.attach(model)
    scramble(model)
    masked = case.logits(model, processor)
    assert not torch.allclose(masked, dense, atol=1e-4)  # the masks change the model
    if case.spec.restore is not None:
        with pytest.raises(UserInputError, match="plain checkpoint"):
            case.spec.export(model, case.config)
        return
    exported = case.spec.export(model, case.config)
    assert not wrappers(exported)
    torch.testing.assert_close(case.logits(exported, processor), masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_saved_masks_restore_identical_logits(case, tmp_path):
    model, processor = case.load()
    case.attach(model)
    scramble(model)
    expected = case.logits(model, processor)
    case.spec.save(model, tmp_path, case.config, {"model": str(case.directory), "method": case.spec.name})
    fresh, _ = case.load()
    restored = case.spec.load(fresh, tmp_path, case.config)
    if case.config.changes_weights:  # the masks alone cannot rebuild rewritten weights: model/ holds them
        saved, masks = hard_masks(restored), hard_masks(model)
        assert saved.keys() == masks.keys() and all(torch.equal(saved[name], masks[name]) for name in masks)
    else:
        assert torch.equal(case.logits(restored, processor), expected)


@pytest.mark.parametrize("case", CASES, indirect=True)
def test_a_short_run_writes_a_complete_run_directory(case, datasets, tmp_path):
    """`prune run` with a tiny recipe: report.json (as returned), report.md, a recipe.yaml that parses to the
    same recipe, the saved masks, model/ when the method has a plain-checkpoint form, and a run directory that
    loads back as the pruned model (equal to the base model + the saved masks)."""
    learnable = case.spec.kind == "learnable"
    output = tmp_path / "run"
    recipe = parse_recipe(
        {
            "model": str(case.directory),
            "task": case.family.task,
            "data": case.family.data(datasets),
            "method": {"name": case.row.method, **case.method},
            **({"train": {"steps": TRAIN_STEPS, "batch_size": 2, "log_every": 1}} if learnable else {}),
            "eval": case.family.eval(),
            "output": str(output),
        }
    )
    report = run(recipe)
    assert json.loads((output / "report.json").read_text()) == json.loads(json.dumps(report))
    achieved = report["sparsity"]["achieved"]
    assert report["method"] == case.row.method and (0.0 <= achieved < 1.0 if learnable else 0.0 < achieved < 1.0)
    assert (output / "report.md").read_text().strip()
    assert load_recipe(output / "recipe.yaml").fingerprint() == report["recipe_fingerprint"]
    if learnable:
        assert report["train"]["steps"] == TRAIN_STEPS and (output / "train" / "train_log.jsonl").is_file()
    assert (output / "model").is_dir() == (case.spec.restore is None)
    pruned, processor = load_model(str(output), task=case.family.task)
    base, _ = case.load()
    rebuilt = case.spec.load(base, output, recipe.method)
    if case.spec.restore is None:
        rebuilt = case.spec.export(rebuilt, recipe.method)
    if not recipe.method.changes_weights:
        torch.testing.assert_close(
            case.logits(rebuilt, processor), case.logits(pruned, processor), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("row", [pytest.param(row, id=row.method) for row in ROWS])
def test_a_bad_config_is_a_clear_error(row):
    """The same words from a recipe and from the Python API."""
    overrides, message = row.bad
    task = FAMILIES[row.families[0]].task
    with pytest.raises(UserInputError, match=message):
        parse_recipe({"task": task, "method": {"name": row.method, **overrides}})
    with pytest.raises(UserInputError, match=message):
        method_config(row.method, **overrides)
