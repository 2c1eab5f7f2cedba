"""The runtime section reaches every stage: the trainer's accelerator follows runtime.device (and its mixed
precision), evaluation batches perplexity and lm-eval by eval.batch_size, latency times the runtime device, and
the sweep's shared model loads in the runtime's dtype and threads."""

from __future__ import annotations

import pytest
import torch

from eval.accuracy import TaskScore
from eval.perplexity import perplexity as eval_perplexity
from prune.core.errors import UserInputError
from prune.runs.recipe import parse_recipe
from prune.sweep.shared import SharedModel
from prune.tasks import causal_lm
from prune.tasks.eval_config import EvalConfig
from prune.training import trainer
from prune.training.config import TrainConfig
from tests.conftest import docs_text, make_tiny_llama, save_tiny_model
from tests.test_train import CountingObjective, config, masked_tiny_llama, patterned_tokens

CPU = torch.device("cpu")


class Heldout:
    """The part of TokenSplits that measure() reads."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def test_blocks(self, seq_len: int) -> torch.Tensor:
        return self.blocks

    def test_text(self, tokenizer) -> str:
        return "held-out text"


def _measure(monkeypatch, batch_size: int | None) -> tuple[dict, dict]:
    """measure() of a tiny Llama on 7 windows; also what batch size perplexity and lm-eval were asked for."""
    asked: dict = {}

    def perplexity(model, blocks, **kwargs):
        asked["perplexity"] = kwargs.get("batch_size", 1)
        return eval_perplexity(model, blocks, **kwargs)

    def accuracy(model, tokenizer, tasks, **kwargs):
        asked["task_accuracy"] = kwargs.get("batch_size", 8)
        return {task: TaskScore(0.5, 0.1) for task in tasks}

    monkeypatch.setattr(causal_lm, "perplexity", perplexity)
    monkeypatch.setattr(causal_lm, "accuracy_scores", accuracy)
    blocks = torch.randint(0, 128, (7, 24), generator=torch.Generator().manual_seed(0))
    settings = EvalConfig(
        tasks=["docs_lastword"],
        flops=False,
        latency=False,
        semi_structured_kernel=False,
        batch_size=batch_size,
        extra_texts=[],
    )
    return causal_lm.measure(make_tiny_llama(), None, Heldout(blocks), settings, 24, "t", extra={}), asked


def test_batched_perplexity_equals_one_window_at_a_time_and_lm_eval_gets_the_batch_size(monkeypatch, one_thread):
    unbatched, asked_default = _measure(monkeypatch, None)
    batched, asked = _measure(monkeypatch, 3)
    assert asked_default == {"perplexity": 1, "task_accuracy": 8}  # no key: the figures of earlier runs
    assert asked == {"perplexity": 3, "task_accuracy": 3}
    assert batched["perplexity"]["tokens"] == unbatched["perplexity"]["tokens"] == 7 * 23
    assert batched["perplexity"]["value"] == pytest.approx(unbatched["perplexity"]["value"], rel=1e-5)


def test_latency_runs_on_the_asked_device_and_leaves_the_model_where_it_was(monkeypatch, one_thread):
    from eval import latency

    seen = []
    real = latency._run_once
    monkeypatch.setattr(
        latency, "_run_once", lambda model, prompt, *args: seen.append(prompt.device) or real(model, prompt, *args)
    )
    model = make_tiny_llama()
    result = latency.measure_latency(model, prompt_len=8, decode_tokens=2, repeats=1, warmup=0, device=CPU)
    assert result.device == "cpu" and seen == [CPU]
    assert next(model.parameters()).device == CPU


def test_trainer_on_runtime_cpu_uses_accelerates_cpu_mode(tmp_path, monkeypatch, one_thread):
    made = []
    real = trainer.Accelerator
    monkeypatch.setattr(trainer, "Accelerator", lambda **kwargs: made.append(kwargs) or real(**kwargs))
    model = masked_tiny_llama()
    result = trainer.train(model, CountingObjective(), patterned_tokens(), config(steps=2), tmp_path, device=CPU)
    assert result.steps == 2 and (tmp_path / "train" / "last.safetensors").is_file()
    assert made == [{"cpu": True, "mixed_precision": "no"}]


def test_auto_mixed_precision_is_bf16_only_on_a_cuda_device_that_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    auto = TrainConfig()
    assert trainer.resolved_precision(auto, torch.device("cuda", 0)) == "bf16"
    assert trainer.resolved_precision(auto, CPU) == "no"
    assert trainer.resolved_precision(TrainConfig(mixed_precision="bf16"), CPU) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert trainer.resolved_precision(auto, torch.device("cuda", 0)) == "no"


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")
    corpus = tmp_path_factory.mktemp("data") / "docs.txt"
    corpus.write_text(docs_text(20_000))

    def recipe(**runtime):
        return parse_recipe(
            {
                "model": str(model_dir),
                "data": {"source": str(corpus), "seq_len": 32},
                "method": {"name": "wanda", "sparsity": "2:4"},
                "runtime": runtime,
            }
        )

    return recipe


def test_sweep_shared_model_loads_in_the_runtime_dtype_and_threads(tiny_recipe, one_thread):
    shared = SharedModel(tiny_recipe(dtype="bfloat16", threads=1, device="cpu"))
    assert {param.dtype for param in shared.model.parameters()} == {torch.bfloat16}
    assert {param.device for param in shared.model.parameters()} == {CPU}
    assert torch.get_num_threads() == 1
    assert shared.runtime.dtype == torch.bfloat16


def test_sweep_shared_model_refuses_offload_and_a_missing_device(tiny_recipe):
    with pytest.raises(UserInputError, match="shared_calibration: false"):
        SharedModel(tiny_recipe(offload="cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="not available"):
            SharedModel(tiny_recipe(device="cuda"))
