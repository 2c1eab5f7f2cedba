"""The one trainer, on a tiny Llama with a toy learnable mask (sigmoid scores, straight-through hard mask)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prune.masks.base import Mask, Objective, WeightMasked, hard_masks, mask_parameters, wrap
from prune.masks.targets import select_targets
from prune.training.config import TrainConfig
from prune.training.trainer import lm_loss, train
from tests.conftest import make_tiny_llama


class ScoreMask(Mask):
    """A learnable mask for tests: soft = sigmoid(scores), hard = scores > 0."""

    def __init__(self, shape):
        super().__init__()
        self.scores = nn.Parameter(torch.full(shape, 0.3))

    def soft(self):
        return torch.sigmoid(self.scores)

    def hard(self):
        return self.scores > 0


class CountingObjective(Objective):
    def __init__(self):
        self.steps_seen = []

    def begin_step(self, step, total_steps):
        self.steps_seen.append(step)
        return {"progress": step / total_steps}

    def regularizer(self, model):
        return 1e-5 * sum(torch.sigmoid(p).sum() for p in mask_parameters(model))


def masked_tiny_llama(seed: int = 0):
    model = make_tiny_llama(seed)
    modules = dict(model.named_modules())
    wrap(
        model,
        {
            name: WeightMasked(modules[name], ScoreMask(modules[name].weight.shape))
            for name in select_targets(model, None)
        },
    )
    return model


def patterned_tokens(rows: int = 32, seq: int = 16) -> torch.Tensor:
    """Learnable data: each row counts upward from a random start (mod 128)."""
    starts = torch.randint(0, 128, (rows, 1), generator=torch.Generator().manual_seed(3))
    return (starts + torch.arange(seq)) % 128


def config(**overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "steps": 12,
            "batch_size": 4,
            "lr": 0.05,
            "log_every": 3,
            "checkpoint_every": 4,
            "warmup_fraction": 0.0,
            **overrides,
        }
    )


def hard_loss(model, data) -> float:
    model.eval()
    with torch.no_grad():
        return lm_loss(model, data).item()


def test_only_mask_parameters_train_and_base_weights_get_no_gradient(tmp_path):
    model = masked_tiny_llama()
    base_before = {name: p.clone() for name, p in model.named_parameters() if ".mask." not in name}
    train(model, CountingObjective(), patterned_tokens(), config(steps=3), tmp_path)
    for name, param in model.named_parameters():
        if ".mask." in name:
            assert param.requires_grad
        else:
            assert not param.requires_grad and param.grad is None
            assert torch.equal(param, base_before[name])


def test_training_lowers_the_hard_masked_loss_and_logs_every_field(tmp_path):
    model, data = masked_tiny_llama(), patterned_tokens()
    before = hard_loss(model, data)
    objective = CountingObjective()
    train(model, objective, data, config(steps=30, log_every=10), tmp_path)
    assert hard_loss(model, data) < before - 0.05
    assert objective.steps_seen == list(range(30))
    records = [json.loads(line) for line in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    for key in ("loss", "task_loss", "regularizer", "progress", "lr", "tokens_per_s", "changed"):
        assert key in records[-1]
    assert records[0]["changed"] is None and 0.0 <= records[-1]["changed"] <= 1.0
    assert records[-1]["lr"] < records[0]["lr"]  # cosine decay


def test_periodic_eval_keeps_best_and_last(tmp_path):
    scores = iter([6.0, 5.0, 3.0, 4.0])  # step 0 (the starting masks), 3, 6, 9
    result = train(
        masked_tiny_llama(),
        CountingObjective(),
        patterned_tokens(),
        config(steps=9, eval_every=3),
        tmp_path,
        evaluate=lambda model: next(scores),
    )
    assert (result.best_step, result.best_score) == (6, 3.0)
    records = [json.loads(line) for line in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval_perplexity"]) for r in records if "eval_perplexity" in r] == [
        (0, 6.0),
        (3, 5.0),
        (6, 3.0),
        (9, 4.0),
    ]


class BudgetObjective(CountingObjective):
    """Selectable from step 6 on, as a size budget that warms up would be."""

    def selectable(self):
        return bool(self.steps_seen) and self.steps_seen[-1] >= 5


def test_best_masks_are_chosen_among_selectable_evaluations_only(tmp_path):
    scores = iter([1.0, 2.0, 4.0, 3.0])  # step 0 and 3 score best but are not selectable
    result = train(
        masked_tiny_llama(),
        BudgetObjective(),
        patterned_tokens(),
        config(steps=9, eval_every=3),
        tmp_path,
        evaluate=lambda model: next(scores),
    )
    assert (result.best_step, result.best_score) == (9, 3.0)
    records = [json.loads(line) for line in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [r["selectable"] for r in records if "eval_perplexity" in r] == [False, False, True, True]


def test_without_a_selectable_evaluation_no_best_is_kept(tmp_path):
    result = train(
        masked_tiny_llama(),
        BudgetObjective(),
        patterned_tokens(),
        config(steps=3, eval_every=3),
        tmp_path,
        evaluate=lambda model: 1.0,
    )
    assert (result.best_step, result.best_score) == (None, None)
    assert not (tmp_path / "train" / "best.safetensors").exists()


def test_starting_masks_stay_best_when_training_never_beats_them(tmp_path):
    scores = iter([2.0, 5.0, 3.0, 4.0])
    result = train(
        masked_tiny_llama(),
        CountingObjective(),
        patterned_tokens(),
        config(steps=9, eval_every=3),
        tmp_path,
        evaluate=lambda model: next(scores),
    )
    assert (result.best_step, result.best_score) == (0, 2.0)
    assert (tmp_path / "train" / "best.safetensors").exists() and (tmp_path / "train" / "last.safetensors").exists()


class Interrupt(Exception):
    pass


def interrupting_loss(at_call: int, task_loss=lm_loss):
    """`task_loss` that raises KeyboardInterrupt (a Ctrl-C) at its `at_call`-th call."""
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return task_loss(model, batch)

    return loss


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tmp_path, grad_accum):
    data = patterned_tokens()
    uninterrupted = masked_tiny_llama()
    train(uninterrupted, CountingObjective(), data, config(grad_accum=grad_accum), tmp_path / "a")

    interrupted = masked_tiny_llama()
    with pytest.raises(KeyboardInterrupt):
        train(
            interrupted,
            CountingObjective(),
            data,
            config(grad_accum=grad_accum),
            tmp_path / "b",
            task_loss=interrupting_loss(at_call=7 * grad_accum + 1),
        )
    pointer = (tmp_path / "b" / "train" / "checkpoints" / "latest").read_text()
    assert pointer == "step-7"  # Ctrl-C wrote a checkpoint of the 7 finished steps
    resumed = masked_tiny_llama()
    objective = CountingObjective()
    train(resumed, objective, data, config(grad_accum=grad_accum), tmp_path / "b", resume=True)
    assert objective.steps_seen == list(range(7, 12))
    for name, mask in hard_masks(uninterrupted).items():
        assert torch.equal(mask, hard_masks(resumed)[name])
    for a, b in zip(mask_parameters(uninterrupted), mask_parameters(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "b" / "train" / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps == [3, 6, 9, 12]


def test_sigterm_checkpoints_like_ctrl_c_and_restores_the_handler(tmp_path):
    import os
    import signal

    calls = {"n": 0}

    def terminated_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5: it is finished, checkpointed, then training stops
            os.kill(os.getpid(), signal.SIGTERM)
        return lm_loss(model, batch)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        train(
            masked_tiny_llama(), CountingObjective(), patterned_tokens(), config(), tmp_path, task_loss=terminated_loss
        )
    assert (tmp_path / "train" / "checkpoints" / "latest").read_text() == "step-5"
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import prune.training.checkpoint as checkpoint_module

    data = patterned_tokens()
    train(masked_tiny_llama(), CountingObjective(), data, config(steps=4), tmp_path)
    real_save = checkpoint_module.save_safetensors

    def failing_save(tensors, path):
        if "optimizer" in str(path):
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_safetensors", failing_save)
    with pytest.raises(OSError):
        train(masked_tiny_llama(), CountingObjective(), data, config(steps=8), tmp_path, resume=True)
    monkeypatch.setattr(checkpoint_module, "save_safetensors", real_save)
    assert (tmp_path / "train" / "checkpoints" / "latest").read_text() == "step-4"
    objective = CountingObjective()
    train(masked_tiny_llama(), objective, data, config(steps=8), tmp_path, resume=True)
    assert objective.steps_seen[0] == 4


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from prune.core.errors import UserInputError

    with pytest.raises(UserInputError, match="no checkpoint"):
        train(masked_tiny_llama(), CountingObjective(), patterned_tokens(), config(), tmp_path, resume=True)


@pytest.mark.slow
def test_two_process_training_averages_gradients_and_ends_with_identical_masks(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): every rank ends with the same masks and the
    hard-masked loss falls as in a single-process run."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "tests.ddp_worker",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads((tmp_path / f"loss-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(loss["world"] == 2 for loss in losses)
    assert losses[0]["after"] == losses[1]["after"] < losses[0]["before"] - 0.05
    rank0, rank1 = (load_file(tmp_path / f"masks-rank{rank}.safetensors") for rank in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    single = masked_tiny_llama()
    data = patterned_tokens()
    before = hard_loss(single, data)
    train(single, CountingObjective(), data, config(steps=30, log_every=10), tmp_path / "single")
    assert hard_loss(single, data) < before - 0.05


def test_a_parameters_lr_scale_sets_its_own_step_size(tmp_path):
    """`param.lr_scale` (e.g. Lagrange multipliers, VIB's log sigma^2) puts it in an AdamW group with lr * scale;
    Adam's first step moves each parameter by its group's lr."""
    fast = nn.Parameter(torch.zeros(()))
    fast.lr_scale = 10.0

    class FastObjective(Objective):
        def regularizer(self, model):
            return -fast  # a constant gradient: Adam's first step is exactly lr in size

        def extra_parameters(self):
            return [fast]

    model = masked_tiny_llama()
    slow = next(p for name, p in model.named_parameters() if name.endswith("mask.scores"))
    start = slow.detach().clone()
    train(model, FastObjective(), patterned_tokens(), config(steps=1, max_grad_norm=0.0), tmp_path)
    assert fast.item() == pytest.approx(10 * 0.05, rel=1e-4)
    assert (slow - start).abs().max().item() == pytest.approx(0.05, rel=1e-2)  # ~lr (tiny gradients vs Adam's eps)
