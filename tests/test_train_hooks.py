"""The trainer's two generic extensions: datasets of dict rows (collated batches), and an Objective that computes
its own gradients (`Objective.backward`, used by gradient dropout)."""

from __future__ import annotations

import json

import torch
from torch import nn
from torch.nn import functional as F

from prune.masks.base import Mask, Objective, WeightMasked
from prune.training.config import TrainConfig
from prune.training.trainer import make_batch, train


class SigmoidMask(Mask):
    def __init__(self, shape):
        super().__init__()
        self.scores = nn.Parameter(torch.full(shape, 0.5))

    def soft(self):
        return torch.sigmoid(self.scores)

    def hard(self):
        return self.scores > 0


class Classifier(nn.Module):
    """A masked linear classifier taking keyword inputs, like a vision model: forward(x, labels) -> logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        linear = nn.Linear(8, 3)
        self.head = WeightMasked(linear, SigmoidMask(linear.weight.shape))

    def forward(self, x, labels=None):
        return self.head(x)


def rows(count: int = 48) -> list[dict]:
    """Separable data: the label is the argmax of the first three features."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(count, 8, generator=generator)
    return [{"x": x[i], "labels": x[i, :3].argmax()} for i in range(count)]


def loss(model, batch):
    return F.cross_entropy(model(**batch), batch["labels"])


def config(**overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "steps": 20,
            "batch_size": 8,
            "lr": 0.1,
            "warmup_fraction": 0.0,
            "log_every": 10,
            "checkpoint_every": 100,
            **overrides,
        }
    )


def test_dict_rows_collate_into_batches():
    batch = make_batch(rows(), torch.tensor([3, 0, 5]), "cpu")
    assert batch["x"].shape == (3, 8) and batch["labels"].tolist() == [int(rows()[i]["labels"]) for i in (3, 0, 5)]


def test_trainer_trains_on_a_dataset_of_dict_rows(tmp_path):
    model, data = Classifier(), rows()
    batch = make_batch(data, torch.arange(len(data)), "cpu")
    with torch.no_grad():
        before = loss(model, batch).item()
    train(model, Objective(), data, config(), tmp_path, task_loss=loss)
    model.eval()
    with torch.no_grad():
        assert loss(model, batch).item() < before - 0.05
    records = [json.loads(line) for line in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()]
    assert "samples_per_s" in records[-1] and "tokens_per_s" not in records[-1]


class HookObjective(Objective):
    """Writes a gradient of +1 into every score (scaled), never calling the task loss's own backward."""

    def __init__(self):
        self.calls = []
        self.backward = self.hook

    def hook(self, model, batch, task_loss, accelerator, scale):
        self.calls.append(scale)
        task = task_loss(model, batch)
        for param in model.parameters():
            if param.requires_grad:
                grad = torch.full_like(param, scale)
                param.grad = grad if param.grad is None else param.grad + grad
        return task.detach(), torch.tensor(0.25)


def test_trainer_calls_the_objective_backward_hook_instead_of_its_own(tmp_path):
    model, objective = Classifier(), HookObjective()
    train(
        model,
        objective,
        rows(),
        config(steps=3, grad_accum=2, max_grad_norm=0.0, log_every=3),
        tmp_path,
        task_loss=loss,
    )
    assert objective.calls == [0.5] * 6  # steps x grad_accum, each with scale 1/grad_accum
    # AdamW's first steps move against a constant +1 gradient by ~lr each: every score went down, uniformly
    scores = model.head.mask.scores
    assert torch.allclose(scores, torch.full_like(scores, scores[0, 0].item()))
    assert scores[0, 0].item() < 0.5 - 0.2
    record = json.loads((tmp_path / "train" / "train_log.jsonl").read_text().splitlines()[-1])
    assert record["regularizer"] == 0.25
