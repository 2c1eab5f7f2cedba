"""Depth pruning (prune.methods.depth): which blocks go, and the model without them.

The exported model is checked against two references: the gated model (the removed blocks' layer gates closed)
and an independent one, the dense model with the removed blocks replaced by an identity module. It must load with
plain transformers, renumber its attention layers, and generate the same tokens with and without a KV cache.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from eval.perplexity import perplexity
from prune import attach, export, method_config
from prune.core.errors import UserInputError
from prune.methods.depth.importance import block_importance
from prune.methods.depth.method import report_depth
from prune.methods.depth.search import greedy_removal
from prune.runs.export import export_run
from prune.runs.pipeline import run
from prune.runs.recipe import parse_recipe
from prune.structural.layout import structure_of
from prune.structural.shrink import has_layer_sizes, load_resized
from tests.conftest import docs_text, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4
CALIBRATION = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
SELECTION = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def make(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny four-block model; qwen2 with sliding-window attention in its last two blocks (`layer_types`)."""
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=256))
    else:
        shape = dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        if family == "llama":
            model = LlamaForCausalLM(LlamaConfig(**shape))
        else:
            config = Qwen2Config(**shape, use_sliding_window=True, sliding_window=6, max_window_layers=2)
            model = Qwen2ForCausalLM(config)
    return model.to(dtype).eval()


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(structure_of(model).blocks)


def make_identity(model: nn.Module, index: int) -> None:
    """Zero what block `index` writes into the residual stream, so its output is its input."""
    block = blocks_of(model)[index]
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if any(part in name for part in ("o_proj", "down_proj", "attn.c_proj", "mlp.c_proj")):
                parameter.zero_()


class Skipped(nn.Module):
    """A removed block as identity: returns the hidden states it reads."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def skipped_copy(model: nn.Module, removed: list[int]) -> nn.Module:
    reference = copy.deepcopy(model)
    blocks = blocks_of(reference)
    for index in removed:
        blocks[index] = Skipped()
    return reference


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=TOKENS, use_cache=False).logits


# ------------------------------------------------------------------------------------------ what is chosen


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_block_that_writes_nothing_has_zero_importance_and_is_the_one_removed(family):
    model = make(family)
    make_identity(model, 2)
    importance = block_importance(model, structure_of(model), CALIBRATION)
    assert importance[2].abs() < 1e-6 and (importance[[0, 1, 3]] > 1e-3).all()
    attach(model, method_config("depth", remove=1, candidates=1), CALIBRATION)
    assert model.maskprune_depth["removed"] == [2] and model.maskprune_depth["kept_layers"] == [0, 1, 3]


def test_greedy_search_takes_the_lowest_validation_loss_among_the_lowest_ranked_blocks():
    importance = [0.1, 0.2, 0.3, 0.4]  # ranked 0, 1, 2, 3
    table = {(0,): 1.0, (1,): 0.9, (0, 1): 2.0, (1, 2): 1.5}
    seen = []

    def loss(blocks):
        seen.append(tuple(sorted(blocks)))
        return table[tuple(sorted(blocks))]

    removed, record = greedy_removal(importance, 2, 2, loss)
    # step 1 tries 0 and 1 (1 is better); step 2 tries 0 and 2 beside 1 (2 is better); then the score-only set
    assert removed == [1, 2] and record["loss"] == 1.5 and record["score_only_loss"] == 2.0
    assert seen == [(0,), (1,), (0, 1), (1, 2), (0, 1)]
    table[(0, 1)] = 1.2  # the score-only set is now better on validation than the greedy one: it wins
    removed, record = greedy_removal(importance, 2, 2, loss)
    assert removed == [0, 1] and record["loss"] == 1.2


def test_one_candidate_is_the_score_alone_without_any_validation_forward():
    def loss(blocks):
        raise AssertionError("no validation evaluation with candidates 1")

    removed, record = greedy_removal([0.3, 0.1, 0.4, 0.2], 2, 1, loss)
    assert removed == [1, 3] and record["score_only"] == [1, 3]


# ------------------------------------------------------------------------------------------ the exported model


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_export_loads_with_plain_transformers_equals_the_skipped_blocks_and_generates_with_a_cache(
    family, dtype, tmp_path
):
    model = make(family, dtype)
    dense = copy.deepcopy(model)
    config = method_config("depth", remove=2)
    attach(model, config, CALIBRATION, SELECTION)
    removed = model.maskprune_depth["removed"]
    gated = logits(model)
    exported = export(model, config)
    exported.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()

    kept = [index for index in range(LAYERS) if index not in removed]
    assert len(removed) == 2 and loaded.config.num_hidden_layers == 2 == len(blocks_of(loaded))
    assert [block.attn.layer_idx if family == "gpt2" else block.self_attn.layer_idx for block in blocks_of(loaded)] == [
        0,
        1,
    ]
    if family == "qwen2":
        assert loaded.config.layer_types == [dense.config.layer_types[index] for index in kept]
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(logits(loaded), gated, **tolerance)
    torch.testing.assert_close(logits(loaded), logits(skipped_copy(dense, removed)), **tolerance)
    if dtype == torch.float32:  # the recorded validation loss is that of the removal set, skipped as identity
        reference = skipped_copy(dense, removed)
        assert model.maskprune_depth["loss"] == pytest.approx(perplexity(reference, SELECTION).nll, rel=1e-5)
    prompt = TOKENS[:1, :8]
    cached = loaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = loaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape[1] == 20 and torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_depth_with_width_removes_blocks_and_units_to_the_whole_models_target(family, tmp_path):
    model = make(family)
    params = sum(parameter.numel() for parameter in model.parameters())
    config = method_config("depth", remove=1, width={"target": {"params": 0.4}, "score": "activation"})
    attach(model, config, CALIBRATION, SELECTION)
    gated = logits(model)
    exported = export(model, config)
    assert exported.config.num_hidden_layers == LAYERS - 1
    assert exported.maskprune_summary["params"]["removed"] >= 0.4
    assert sum(parameter.numel() for parameter in exported.parameters()) == exported.maskprune_summary["params"]["kept"]
    assert sum(parameter.numel() for parameter in exported.parameters()) < 0.75 * params
    torch.testing.assert_close(logits(exported), gated, rtol=1e-4, atol=1e-4)
    exported.save_pretrained(tmp_path)
    # Llama's config says the uniform kept sizes; GPT-2's cannot (heads x head_dim must equal its width): prune's loader
    assert has_layer_sizes(tmp_path) == (family == "gpt2")
    loaded = load_resized(tmp_path) if family == "gpt2" else AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(loaded), gated, rtol=1e-4, atol=1e-4)


def test_the_report_measures_depth_with_width_in_the_width_targets_unit():
    model = make("llama")
    config = method_config("depth", remove=1, width={"target": {"flops": 0.4}})
    attach(model, config, CALIBRATION, SELECTION)
    entries = report_depth(export(model, config), config, None, {})
    assert entries["sparsity"]["measure"] == "flops" and entries["sparsity"]["achieved"] >= 0.4
    assert entries["sparsity"]["target"] == "1 block + width flops 0.4"
    assert (
        entries["depth"]["kept_layers"] == entries["structure"]["kept_layers"] and len(entries["depth"]["removed"]) == 1
    )


# ------------------------------------------------------------------------------------------ refused input


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"remove": LAYERS}, "removes 4 of the model's 4 blocks"),
        ({"remove": 0.05}, "removes 0 of the model's 4 blocks"),
        ({"remove": 1, "width": {"target": {"params": 0.1}}}, "already met by the removed blocks"),
    ],
)
def test_removing_every_block_none_or_more_than_the_target_is_refused(fields, words):
    with pytest.raises(UserInputError, match=words):
        attach(make("llama"), method_config("depth", **fields), CALIBRATION, SELECTION)


@pytest.mark.parametrize("remove", [1.0, 1.5, 0, -2])
def test_a_share_of_one_or_more_or_no_block_is_refused_by_the_config(remove):
    with pytest.raises(UserInputError, match="remove"):
        method_config("depth", remove=remove)


def test_unsupported_architectures_and_inverse_layer_scaling_are_refused():
    opt = OPTForCausalLM(
        OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4)
    )
    with pytest.raises(UserInputError, match="no structural map"):
        attach(opt, method_config("depth", remove=1), CALIBRATION, SELECTION)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, scale_attn_by_inverse_layer_idx=True)
    )
    with pytest.raises(UserInputError, match="scale_attn_by_inverse_layer_idx"):
        attach(gpt2, method_config("depth", remove=1), CALIBRATION, SELECTION)


def test_a_validation_search_without_validation_windows_is_refused():
    with pytest.raises(UserInputError, match="candidates: 1"):
        attach(make("llama"), method_config("depth", remove=1), CALIBRATION)


# ------------------------------------------------------------------------------------------ a run


def test_a_run_removing_every_block_fails_before_the_output_is_claimed(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", "llama", docs_text(20_000))
    recipe = parse_recipe(
        {"model": str(model_dir), "method": {"name": "depth", "remove": 2}, "output": str(tmp_path / "run")}
    )
    with pytest.raises(UserInputError, match="removes 2 of the model's 2 blocks"):
        run(recipe)
    assert not (tmp_path / "run").exists()


def test_a_run_reports_the_kept_blocks_and_chooses_on_validation_windows(tmp_path):
    """`prune run`: the report names the kept and removed blocks with their importance, the choice read
    validation windows (never test), and the exported model is measured against the dense one."""
    model_dir = save_tiny_model(tmp_path / "model", "llama", docs_text(20_000))
    (tmp_path / "docs.txt").write_text(docs_text(20_000))
    recipe = parse_recipe(
        {
            "model": str(model_dir),
            "data": {"source": str(tmp_path / "docs.txt"), "calibration_samples": 4, "seq_len": 32},
            "method": {"name": "depth", "remove": 1},
            "train": {"eval_windows": 3},
            "eval": {"tasks": [], "semi_structured_kernel": False},
            "output": str(tmp_path / "run"),
        }
    )
    report = run(recipe)
    assert report["data"]["used"]["selection"] == {"part": "validation", "windows": 3}
    depth = report["depth"]
    assert depth["validation_windows"] == 3 and len(depth["importance"]) == 2 and len(depth["removed"]) == 1
    assert report["structure"]["kept_layers"] == depth["kept_layers"] == [1 - depth["removed"][0]]
    assert set(report["speedup"]) == {"prefill", "decode"}
    model_dir = tmp_path / "run" / "model"
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 1
    written = logits(AutoModelForCausalLM.from_pretrained(model_dir))
    shutil.rmtree(model_dir)
    export_run(tmp_path / "run")  # `prune export`: the base model and the saved gates give the same model again
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(model_dir)), written)
