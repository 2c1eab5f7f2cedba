"""The memory preflight's estimate (prune.runs.preflight.memory_stages), checked on the skeletons of real-sized
configs without allocating anything: what each stage adds scales with the setting that decides it, and a run
that cannot fit is refused with the estimate, the limit and the setting to change."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import LlamaConfig, LlamaForCausalLM

from prune.core.errors import UserInputError
from prune.methods.registry import get_method
from prune.models.preflight import GB, shape_of, size_of
from prune.models.runtime import Runtime
from prune.runs import preflight
from prune.runs.recipe import parse_recipe

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama_7b():
    """Llama-2-7B's shapes on the meta device: no memory."""
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    )
    with init_empty_weights():
        return LlamaForCausalLM(config)


def recipe(**sections):
    return parse_recipe({"method": {"name": "nm_gumbel", "sparsity": "2:4", "prior": "magnitude"}, **sections})


def stages(model, recipe_, dtype=torch.bfloat16):
    spec = get_method(recipe_.method.name)
    return {
        stage.name.split(" ")[0]: stage
        for stage in preflight.memory_stages(recipe_, spec, Runtime(CPU, dtype, "none"), model)
    }


def test_the_shape_is_read_from_the_skeleton(llama_7b):
    shape = shape_of(llama_7b)
    assert (shape.hidden, shape.vocab, shape.blocks) == (4096, 32000, 32)
    # q, k, v, o: 4096 -> 4096; gate, up: 4096 -> 11008; down: 11008 -> 4096
    assert shape.block_features == 4 * 8192 + 3 * (4096 + 11008)


def test_each_stage_grows_with_the_setting_that_decides_it(llama_7b):
    small = stages(llama_7b, recipe(train={"steps": 10, "batch_size": 1}, data={"seq_len": 512}))
    large = stages(llama_7b, recipe(train={"steps": 10, "batch_size": 8}, data={"seq_len": 512}))
    per_token = shape_of(llama_7b).training_bytes_per_token(torch.bfloat16)
    assert small["training"].parts["activations"][0] == 512 * per_token
    assert large["training"].parts["activations"][0] == 8 * 512 * per_token
    targeted = sum(
        p.numel() for name, p in llama_7b.named_parameters() if name.startswith("model.layers.") and p.dim() == 2
    )
    assert small["training"].parts["mask training state"][0] == round(targeted * 1.5 * 16)  # 2:4: 6 per 4 weights
    assert small["training"].parts["weights"][0] == size_of(llama_7b).bytes(torch.bfloat16)
    distilled = stages(llama_7b, recipe(train={"steps": 10, "distill": 0.5}, data={"seq_len": 512}))
    assert distilled["training"].parts["distillation teacher"][0] == size_of(llama_7b).bytes(torch.bfloat16)
    many = stages(llama_7b, recipe(train={"steps": 10}, data={"seq_len": 512, "calibration_samples": 1024}))
    assert many["calibration"].parts["activations"][0] == 1024 * 512 * 4096 * 2
    batched = stages(llama_7b, recipe(train={"steps": 10}, data={"seq_len": 512}, eval={"batch_size": 64}))
    per_token = shape_of(llama_7b).inference_bytes_per_token(torch.bfloat16)
    assert batched["evaluation"].parts["activations"][0] == 64 * 512 * per_token
    assert "training" not in stages(llama_7b, recipe())  # no steps: nothing trains


def test_a_run_that_cannot_fit_names_the_estimate_the_limit_and_the_setting(llama_7b, monkeypatch):
    """The fix named is the one for the largest part: the batch when activations dominate, the targets when the
    trained masks' state does (learned 2:4 masks of a 7B model: 6 float32 logits per 4 weights, with Adam's)."""
    monkeypatch.setattr(preflight, "available_ram", lambda: 64 * GB)
    runtime = Runtime(CPU, torch.bfloat16, "none")
    oneshot = parse_recipe({"method": {"name": "wanda"}, "data": {"seq_len": 512, "calibration_samples": 16}})
    preflight.check_memory(oneshot, get_method("wanda"), runtime, llama_7b)
    with pytest.raises(
        UserInputError,
        match=r"evaluation \(512 windows of 4096 tokens.*GB of RAM.*and 64.00 GB is "
        r"free. To fit, lower eval.batch_size",
    ):
        big_eval = parse_recipe({"method": {"name": "wanda"}, "data": {"seq_len": 4096}, "eval": {"batch_size": 512}})
        preflight.check_memory(big_eval, get_method("wanda"), runtime, llama_7b)
    learned = recipe(train={"steps": 10, "batch_size": 1}, data={"seq_len": 512, "calibration_samples": 16})
    with pytest.raises(UserInputError, match=r"mask training state 144.75 GB.*To fit, target fewer layers"):
        preflight.check_memory(learned, get_method("nm_gumbel"), runtime, llama_7b)


def test_the_processes_of_a_cpu_launch_share_the_ram(llama_7b, monkeypatch):
    spec, runtime = get_method("wanda"), Runtime(CPU, torch.bfloat16, "none")
    run = parse_recipe({"method": {"name": "wanda"}, "data": {"seq_len": 512, "calibration_samples": 16}})
    need = max(stage.total for stage in preflight.memory_stages(run, spec, runtime, llama_7b))
    monkeypatch.setattr(preflight, "available_ram", lambda: int(need * 1.5))
    preflight.check_memory(run, spec, runtime, llama_7b)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserInputError, match="2 processes x"):
        preflight.check_memory(run, spec, runtime, llama_7b)
