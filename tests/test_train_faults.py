"""Faults during training: Ctrl-C / SIGTERM at any point of a step, then `--resume`, must end with the masks of an
uninterrupted run, bit for bit, for every learnable method; a non-finite loss, gradient or parameter stops
training without saving anything non-finite; a checkpoint or best-masks file that does not fit is refused."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from eval.metric_errors import NonFiniteError
from prune.core.errors import UserInputError
from prune.masks.base import Objective
from prune.methods.registry import get_method
from prune.training.config import TrainConfig
from prune.training.trainer import TrainResult, keep_best, lm_loss, train, trainable_parameters
from tests.conftest import make_tiny_llama

STEPS = 6

METHOD_CONFIGS = {
    "nm_gumbel": {"name": "nm_gumbel", "prior": "magnitude"},  # Gumbel noise every forward
    "vib": {"name": "vib", "target": {"params": 0.3}},  # Gaussian gate samples every forward
    "binary": {"name": "binary", "targets": ["*mlp.*_proj"], "gradient_dropout": 0.3},  # uniform draws in backward
    "gating": {"name": "gating", "predictor_rank": 8},  # random low-rank predictor init, no draws in training
}


@pytest.fixture(autouse=True)
def sigint_delivered():
    """A shell starts background jobs with SIGINT ignored (`cmd &` without job control), and the trainer keeps an
    ignored signal ignored; these tests send SIGINT, so they install Python's default handler for their duration."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def attached(method: str):
    """A tiny Llama with the method's masks, attached after seeding (as the pipeline does)."""
    model = make_tiny_llama()
    spec = get_method(method)
    torch.manual_seed(0)
    objective = spec.attach(model, spec.config_class.model_validate(METHOD_CONFIGS[method]), None)
    return model, objective


def tokens(rows: int = 16, seq: int = 16) -> torch.Tensor:
    starts = torch.randint(0, 128, (rows, 1), generator=torch.Generator().manual_seed(3))
    return (starts + torch.arange(seq)) % 128


def train_config(**overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "steps": STEPS,
            "batch_size": 1,
            "grad_accum": 2,
            "lr": 0.05,
            "log_every": 1,
            "checkpoint_every": 4,
            "warmup_fraction": 0.0,
            **overrides,
        }
    )


def mask_state(model, objective) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in trainable_parameters(model, objective).items()}


_reference: dict[str, dict[str, torch.Tensor]] = {}


def uninterrupted(method: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    if method not in _reference:
        model, objective = attached(method)
        train(model, objective, tokens(), train_config(), tmp_path / "reference")
        _reference[method] = mask_state(model, objective)
    return _reference[method]


class Fault:
    """Interrupts training once, during 1-based step `step`, at the `nth` time it passes `point`: "forward"
    (after the last decoder layer ran, so every layer's noise is drawn), "backward" (while a mask parameter's
    gradient is computed) or "update" (right after the optimizer moved the parameters). With two micro-batches
    per step, the second forward or backward comes after the first one's random draws (binary's gradient
    dropout draws in its backward). `how`: a signal sent to this process, or a KeyboardInterrupt raised on the
    spot (a second Ctrl-C, or code that raises it)."""

    def __init__(self, model, objective, how: str, point: str, step: int, nth: int):
        self.how, self.point, self.step, self.nth = how, point, step, nth
        self.current, self.seen, self.fired = 0, 0, False
        begin_step = objective.begin_step

        def recording_begin_step(index, total):
            self.current, self.seen = index + 1, 0
            return begin_step(index, total)

        objective.begin_step = recording_begin_step
        param = next(iter(trainable_parameters(model, objective).values()))
        self.handles = [
            model.model.layers[-1].register_forward_hook(lambda *args: self.at("forward")),
            param.register_hook(lambda grad: self.at("backward")),
            register_optimizer_step_post_hook(lambda *args: self.at("update")),
        ]

    def at(self, point: str) -> None:
        if point != self.point or self.current != self.step:
            return
        if point == "forward" and not torch.is_grad_enabled():  # a reference forward (binary) or an evaluation
            return
        self.seen += 1
        if self.fired or self.seen != self.nth:
            return
        self.fired = True
        if self.how == "raise":
            raise KeyboardInterrupt
        os.kill(os.getpid(), getattr(signal, self.how))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "raise"])
@pytest.mark.parametrize(
    "point, step, nth", [("forward", 2, 1), ("forward", 5, 2), ("backward", 3, 2), ("update", 5, 1)]
)
@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_resume_after_an_interrupt_anywhere_in_a_step_equals_the_uninterrupted_run(
    tmp_path_factory, one_thread, method, point, step, nth, how
):
    reference = uninterrupted(method, tmp_path_factory.mktemp("reference"))
    run = tmp_path_factory.mktemp("run")
    model, objective = attached(method)
    fault = Fault(model, objective, how, point, step, nth)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(model, objective, tokens(), train_config(), run)
    finally:
        fault.remove()
    assert fault.fired
    latest = (run / "train" / "checkpoints" / "latest").read_text()
    if how != "raise":  # a signal lets the step finish, then checkpoints it
        assert latest == f"step-{step}"
    model, objective = attached(method)
    result = train(model, objective, tokens(), train_config(), run, resume=True)
    assert result.steps == STEPS
    resumed = mask_state(model, objective)
    assert resumed.keys() == reference.keys()
    different = [name for name in reference if not torch.equal(resumed[name], reference[name])]
    assert not different, f"{len(different)} of {len(reference)} mask tensors differ, e.g. {different[:2]}"


def test_a_second_signal_stops_at_once_and_the_resume_still_matches(tmp_path, one_thread):
    """The first Ctrl-C asks for a stop at the end of the step; a second one (impatient user) interrupts the
    forward itself: the checkpoint then holds the last completed step, with the random state of its end."""
    reference = uninterrupted("nm_gumbel", tmp_path)
    model, objective = attached("nm_gumbel")
    calls = {"n": 0}

    def twice_interrupted(masked, batch):
        calls["n"] += 1
        value = lm_loss(masked, batch)  # the step's noise is drawn
        if calls["n"] == 5:  # step 3's first micro-batch
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return value

    with pytest.raises(KeyboardInterrupt):
        train(model, objective, tokens(), train_config(), tmp_path / "run", task_loss=twice_interrupted)
    assert (tmp_path / "run" / "train" / "checkpoints" / "latest").read_text() == "step-2"
    model, objective = attached("nm_gumbel")
    train(model, objective, tokens(), train_config(), tmp_path / "run", resume=True)
    resumed = mask_state(model, objective)
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)


def test_signal_handlers_are_restored_after_training(tmp_path, one_thread):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    model, objective = attached("vib")
    train(model, objective, tokens(), train_config(steps=1), tmp_path)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ------------------------------------------------------------------------------------------- non-finite values


def strict_records(path: Path) -> list[dict]:
    """train_log.jsonl parsed so that NaN / Infinity (which json writes by default) are errors."""

    def refuse(constant):
        raise AssertionError(f"{constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def nan_at(call: int):
    """A task loss that is NaN at its `call`-th call (two calls per step: two micro-batches)."""
    calls = {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        value = lm_loss(model, batch)
        return value * float("nan") if calls["n"] == call else value

    return loss


def checkpoint_tensors(run: Path) -> dict[str, torch.Tensor]:
    directory = run / "train" / "checkpoints" / (run / "train" / "checkpoints" / "latest").read_text()
    return {**load_file(directory / "masks.safetensors"), **load_file(directory / "optimizer.safetensors")}


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, one_thread):
    model, objective = attached("nm_gumbel")
    with pytest.raises(NonFiniteError, match=r"step 6\b.*loss") as error:
        train(model, objective, tokens(), train_config(), tmp_path, task_loss=nan_at(12))
    assert "step 4" in str(error.value)  # the checkpoint that stays in force
    assert (tmp_path / "train" / "checkpoints" / "latest").read_text() == "step-4"
    assert all(torch.isfinite(t).all() for t in checkpoint_tensors(tmp_path).values() if t.is_floating_point())
    assert [record["step"] for record in strict_records(tmp_path / "train" / "train_log.jsonl")] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "train" / "last.safetensors").exists()


def test_a_huge_learning_rate_stops_training_and_writes_nothing_non_finite(tmp_path, one_thread):
    model, objective = attached("vib")
    with pytest.raises(NonFiniteError, match=r"step (\d+)") as error:
        train(
            model,
            objective,
            tokens(),
            train_config(lr=1e30, checkpoint_every=1, eval_every=1),
            tmp_path,
            evaluate=lambda masked: 1.0,
        )
    failed = int(re.search(r"step (\d+)", str(error.value)).group(1))
    records = strict_records(tmp_path / "train" / "train_log.jsonl")
    assert max(record["step"] for record in records) == failed - 1  # every finished step logged, the failed one not
    assert (tmp_path / "train" / "checkpoints" / "latest").read_text() == f"step-{failed - 1}"
    assert all(torch.isfinite(t).all() for t in checkpoint_tensors(tmp_path).values() if t.is_floating_point())
    best = tmp_path / "train" / "best.safetensors"
    assert not best.exists() or all(torch.isfinite(t).all() for t in load_file(best).values())


class NaNGradient(Objective):
    """A regularizer that is 0 in value with a NaN gradient (sqrt at 0 times a zero slope)."""

    def __init__(self, inner):
        self.inner = inner

    def begin_step(self, step, total_steps):
        return self.inner.begin_step(step, total_steps)

    def regularizer(self, model):
        first = next(p for p in model.parameters() if p.requires_grad)
        return self.inner.regularizer(model) + torch.sqrt((first - first.detach()).abs().sum())


def test_a_nan_gradient_stops_training_before_the_update(tmp_path, one_thread):
    model, objective = attached("nm_gumbel")
    before = mask_state(model, objective)
    with pytest.raises(NonFiniteError, match=r"step 1\b.*gradient"):
        train(model, NaNGradient(objective), tokens(), train_config(max_grad_norm=0.0), tmp_path)
    after = mask_state(model, objective)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_the_cli_exits_1_on_divergence_and_writes_no_report(tmp_path, one_thread):
    import yaml

    from prune.cli import main
    from tests.conftest import docs_text, save_tiny_model

    corpus = tmp_path / "docs.txt"
    corpus.write_text(docs_text(20_000))
    recipe = {
        "model": str(save_tiny_model(tmp_path / "model")),
        "data": {"source": str(corpus), "seq_len": 32, "calibration_samples": 2},
        "method": {"name": "vib", "target": {"params": 0.3}},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e30, "checkpoint_every": 1, "log_every": 1},
        "eval": {"dense_baseline": False, "tasks": [], "flops": False, "latency": False},
        "export": {"save_model": False},
        "output": str(tmp_path / "run"),
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "recipe.yaml")]) == 1
    assert not (tmp_path / "run" / "report.json").exists()
    strict_records(tmp_path / "run" / "train" / "train_log.jsonl")


# --------------------------------------------------------------------------------------------------- seeds


def nm_gumbel_run(model_dir: Path, corpus: Path, output: Path, seed: int) -> dict[str, torch.Tensor]:
    """A `prior: none` run without training steps: its masks are the argmax of the initial logits."""
    from prune.masks.storage import read_masks
    from prune.runs.pipeline import run
    from prune.runs.recipe import parse_recipe

    run(
        parse_recipe(
            {
                "model": str(model_dir),
                "data": {"source": str(corpus), "seq_len": 32, "calibration_samples": 2},
                "method": {"name": "nm_gumbel", "prior": "none"},
                "eval": {"dense_baseline": False, "perplexity": False, "tasks": [], "flops": False, "latency": False},
                "export": {"save_model": False},
                "seed": seed,
                "output": str(output),
            }
        )
    )
    return read_masks(output)[0]


def test_prior_none_logits_follow_the_recipe_seed(tmp_path, one_thread):
    from tests.conftest import docs_text, save_tiny_model

    corpus = tmp_path / "docs.txt"
    corpus.write_text(docs_text(20_000))
    model_dir = save_tiny_model(tmp_path / "model")
    first, again, other = (
        nm_gumbel_run(model_dir, corpus, tmp_path / name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))
    )
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


# ----------------------------------------------------------------------------------------- tensors that do not fit


def checkpointed_run(tmp_path: Path) -> Path:
    model, objective = attached("vib")
    train(model, objective, tokens(), train_config(steps=4), tmp_path)
    return tmp_path / "train" / "checkpoints" / "step-4"


def resume(tmp_path: Path) -> None:
    model, objective = attached("vib")
    train(model, objective, tokens(), train_config(steps=6), tmp_path, resume=True)


def replace_tensor(path: Path, change, prefix: str = "") -> str:
    """Change the first tensor (name starting with `prefix`) that has more than one row; returns its name."""
    tensors = load_file(path)
    name = next(
        name
        for name, tensor in sorted(tensors.items())
        if name.startswith(prefix) and tensor.dim() >= 1 and tensor.shape[0] > 1
    )
    tensors[name] = change(tensors[name])
    save_file(tensors, path)
    return name


def test_a_checkpoint_tensor_of_another_shape_is_refused_not_broadcast(tmp_path, one_thread):
    source = checkpointed_run(tmp_path)
    name = replace_tensor(source / "masks.safetensors", lambda tensor: tensor[:1].clone())
    with pytest.raises(UserInputError, match="shape") as error:
        resume(tmp_path)
    message = str(error.value)
    assert name in message and "--overwrite" in message


def test_a_checkpoint_tensor_of_another_dtype_is_refused(tmp_path, one_thread):
    source = checkpointed_run(tmp_path)
    replace_tensor(source / "optimizer.safetensors", lambda tensor: tensor.double(), "state.")
    with pytest.raises(UserInputError, match="float64"):
        resume(tmp_path)


def test_an_optimizer_state_of_another_shape_is_refused(tmp_path, one_thread):
    source = checkpointed_run(tmp_path)
    name = replace_tensor(source / "optimizer.safetensors", lambda tensor: tensor[:1].clone(), "state.")
    with pytest.raises(UserInputError, match="shape") as error:
        resume(tmp_path)
    assert name in str(error.value)


@pytest.mark.parametrize("step", ["4", 4.5, None, True])
def test_a_trainer_state_whose_step_is_not_an_integer_is_a_clear_error(tmp_path, one_thread, step):
    source = checkpointed_run(tmp_path)
    state = json.loads((source / "trainer_state.json").read_text())
    state["step"] = step
    (source / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(UserInputError, match="step"):
        resume(tmp_path)


def test_best_masks_of_another_shape_are_refused(tmp_path, one_thread):
    model, objective = attached("nm_gumbel")
    train(model, objective, tokens(), train_config(steps=2, eval_every=1), tmp_path, evaluate=lambda masked: 1.0)
    name = replace_tensor(tmp_path / "train" / "best.safetensors", lambda tensor: tensor[:1].clone())
    with pytest.raises(UserInputError, match="shape") as error:
        keep_best(model, objective, tmp_path, TrainResult(2, 1.0, 0, 0.0))
    assert name in str(error.value) and "best.safetensors" in str(error.value)


# ------------------------------------------------------------------------------------- the real SmolLM2-135M


@pytest.mark.integration
def test_smollm2_nm_gumbel_resumed_after_ctrl_c_at_step_3_equals_the_uninterrupted_run(
    tmp_path, smollm2_dir, monkeypatch
):
    """A real-model case, kept short: nm_gumbel on the query projections of SmolLM2-135M, 6 steps of 64
    tokens, a checkpoint every 4; Ctrl-C during step 3's forward (after its Gumbel noise was drawn), then
    --resume."""
    from prune.masks.storage import read_masks
    from prune.runs import pipeline
    from prune.runs.recipe import parse_recipe

    def recipe(output: Path):
        return parse_recipe(
            {
                "model": "smollm2-135m",
                "data": {"seq_len": 64, "calibration_samples": 1},
                "method": {"name": "nm_gumbel", "prior": "magnitude", "targets": ["*.self_attn.q_proj"]},
                "train": {
                    "steps": 6,
                    "batch_size": 1,
                    "lr": 0.01,
                    "log_every": 3,
                    "checkpoint_every": 4,
                    "warmup_fraction": 0.0,
                },
                "eval": {"dense_baseline": False, "perplexity": False, "tasks": [], "flops": False, "latency": False},
                "export": {"save_model": False},
                "output": str(output),
            }
        )

    pipeline.run(recipe(tmp_path / "uninterrupted"))
    real_train = pipeline.train

    def interrupted_train(model, objective, *args, **kwargs):
        Fault(model, objective, "SIGINT", "forward", 3, 1)
        return real_train(model, objective, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train", interrupted_train)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe(tmp_path / "interrupted"))
    assert (tmp_path / "interrupted" / "train" / "checkpoints" / "latest").read_text() == "step-3"
    monkeypatch.setattr(pipeline, "train", real_train)
    pipeline.run(recipe(tmp_path / "interrupted"), resume=True)

    runs = [tmp_path / "uninterrupted", tmp_path / "interrupted"]
    expected, found = (load_file(run / "train" / "last.safetensors") for run in runs)
    assert all(torch.equal(expected[key], found[key]) for key in expected)  # the logits, bit for bit
    expected, found = (read_masks(run)[0] for run in runs)
    assert all(torch.equal(expected[key], found[key]) for key in expected)
    logged = [strict_records(run / "train" / "train_log.jsonl") for run in runs]
    assert [(r["step"], r["loss"]) for r in logged[0]] == [(r["step"], r["loss"]) for r in logged[1]]
    assert [r["step"] for r in logged[0]] == [3, 6]


def test_a_log_line_cut_short_by_a_crash_is_dropped_on_resume(tmp_path, one_thread):
    """kill -9 while a line is written leaves half a JSON object at the end of train_log.jsonl."""
    model, objective = attached("vib")
    train(model, objective, tokens(), train_config(steps=4), tmp_path)
    log = tmp_path / "train" / "train_log.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "loss": 1.2')
    resume(tmp_path)
    assert [record["step"] for record in strict_records(log)] == [1, 2, 3, 4, 5, 6]


def test_structural_masks_of_another_shape_are_refused(tmp_path):
    from prune.structural.store import load_gates, save_gates

    model, objective = attached("vib")
    save_gates(model, tmp_path, objective.config, {"model": "tiny", "method": "vib"})
    name = replace_tensor(tmp_path / "masks.safetensors", lambda tensor: tensor[:1].clone())
    with pytest.raises(UserInputError, match="shape") as error:
        load_gates(make_tiny_llama(), tmp_path)
    assert name in str(error.value)
