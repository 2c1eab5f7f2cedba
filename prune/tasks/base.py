"""`Task`: the one seam between a run and what kind of model it prunes.

The pipeline (prune.runs.pipeline) is one flow for every kind of model; everything that differs between a
causal LM on text, CLIP as a zero-shot classifier and an image classifier with its own head lives behind
this interface: how a model (alias, directory, Hub id) loads and how it is held, pruned and saved (in memory here;
streamed from disk block by block in prune.tasks.streamed), which data the recipe's `data` section names, what the
trainer trains on (and with which loss), the held-out score its periodic evaluation minimizes, the figures
of the dense and the pruned model, and the report's task fields and report.md note.

A task is a class: its class attributes and class methods are what the recipe and the loaders need before
a model exists; an instance is one run's model and data (made by the pipeline after loading the model).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from prune.calibration.layerwise import BlockPlacement
from prune.core.atomic import save_pretrained_atomic
from prune.core.config import MethodConfig
from prune.core.memory import release_freed_memory
from prune.masks.base import achieved_sparsity
from prune.methods.spec import HeldOut, MethodSpec
from prune.tasks.eval_config import EvalConfig


class RunSettings(Protocol):
    """The recipe sections a task reads (prune.runs.recipe.Recipe has them)."""

    model: str
    data: Any
    train: Any  # prune.training.config.TrainConfig
    recover: Any  # prune.recovery.config.RecoverConfig
    eval: EvalConfig
    seed: int


class StageSettings(Protocol):
    """What a task reads of one training stage's settings: recipe.train for mask training, recipe.recover for
    recovery (a TrainConfig each)."""

    distill: float
    eval_windows: int


class Task(ABC):
    """One kind of model and data. Subclasses set the class attributes and implement the methods below."""

    name: ClassVar[str]  # the recipe's `task:` value
    metric: ClassVar[str]  # the held-out score the trainer minimizes: perplexity | error
    unit: ClassVar[str]  # what a training sample is counted in on train_curve.png: tokens | images

    def __init__(self, model: nn.Module, processor, settings: RunSettings, device: torch.device | None = None):
        self.model = model  # what a method attaches its masks to
        self.processor = processor  # saved beside model/: a tokenizer or a processor
        self.settings = settings
        self.device = device  # runtime.device: where latency is timed (None: where the model is)

    @classmethod
    @abstractmethod
    def load_model(cls, name_or_path: str, dtype: torch.dtype) -> tuple[nn.Module, object]:
        """(model in eval mode, tokenizer or processor) for an alias, a model directory or a Hub id."""

    @classmethod  # noqa: B027 (an optional hook: nothing to check by default)
    def check_model(cls, model: nn.Module, settings: RunSettings) -> None:
        """Raise UserInputError for what the loaded model rules out before any data is read (nothing by default):
        run before the output directory is claimed and before the first forward."""

    @staticmethod
    @abstractmethod
    def note(report: dict) -> str:
        """report.md's sentence on what the figures were measured on."""

    @property
    def module(self) -> nn.Module:
        """What runs one sample: the model itself by default (CLIP runs wrapped as a zero-shot classifier). The
        trainer trains it (parameters saved by their names in it), the held-out score and method hooks run it."""
        return self.model

    def use_model(self, model: nn.Module) -> None:
        """Measure `model` from now on (the exported model replaces the masked one)."""
        self.model = model

    def apply_method(
        self,
        spec: MethodSpec,
        config: MethodConfig,
        calibration: Tensor | None,
        placement: BlockPlacement | None = None,
    ) -> object:
        """Attach the method's masks to the model in memory; returns what `spec.attach` returns (a learnable
        method's objective, which the trainer then trains). `placement`: where blocks wait under runtime.offload:
        cpu (None: the model is on the device). A method that chooses on validation data (`spec.needs_selection`)
        also receives the task's `selection()`."""
        options = {} if placement is None else {"placement": placement}  # block-by-block methods only
        if spec.needs_selection:
            options["selection"] = self.selection()
        return spec.attach(self.model, config, calibration, **options)

    def sparsity(self) -> float:
        """The share of targeted weights the attached masks remove."""
        return achieved_sparsity(self.model)

    def save_masks(self, spec: MethodSpec, directory: Path, config: MethodConfig, meta: dict) -> None:
        """Write the method's masks (gates, predictors) into the run directory, through its `save` hook."""
        spec.save(self.model, directory, config, meta)

    def export(self, spec: MethodSpec, config: MethodConfig) -> None:
        """Measure the method's exported model from now on (masks merged, a structural export shrunk); the freed
        masks go back to the OS before the evaluation allocates its own buffers."""
        self.use_model(spec.export(self.model, config))
        release_freed_memory()

    def save_model(self, directory: Path) -> None:
        """Write the (exported) model and its tokenizer or processor as a plain checkpoint, whole or absent."""
        save_pretrained_atomic(directory, self.model, self.processor)

    def calibration(self) -> Tensor | None:
        """Calibration inputs for methods that need them (only causal-lm has them; see MethodSpec.tasks)."""
        return None

    def selection(self) -> Tensor | None:
        """Validation inputs a method chooses on (only causal-lm has them; see MethodSpec.needs_selection)."""
        return None

    @property
    def sample_size(self) -> int:
        """How many `unit`s one training sample holds (tokens in a window; 1 for an image)."""
        return 1

    @abstractmethod
    def train_data(self) -> Tensor | Sequence:
        """Rows the trainer batches: token blocks, or a dataset of {"pixel_values", "labels"} rows."""

    @abstractmethod
    def loss(self, model: nn.Module, batch, stage: StageSettings) -> Tensor:
        """The trainer's task loss on one batch of `train_data()`, for the training `stage` (its distill weight)."""

    @abstractmethod
    def heldout_score(self, model: nn.Module, stage: StageSettings) -> float:
        """The periodic evaluation's held-out `metric` of the current model (lower is better), for the training
        `stage` (how many validation windows it reads)."""

    @abstractmethod
    def measure(self, label: str) -> dict:
        """The figures of the current model, keyed like report.json; `seconds` says how long it took."""

    @abstractmethod
    def heldout(self) -> HeldOut:
        """The held-out samples a method's own report hook measures on."""

    def check_data(self, spec) -> None:  # noqa: B027 (an optional hook: nothing to check by default)
        """Raise UserInputError when the data cannot serve what the method `spec` needs (nothing by default)."""

    def fields(self) -> dict:
        """Report entries of the task itself, taken while the masks are still attached (none by default)."""
        return {}
