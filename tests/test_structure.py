"""The structural map, its size arithmetic, and the physical export on tiny Llama (GQA) and GPT-2 models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from eval.flops import count_flops, count_params
from prune.core.errors import UserInputError
from prune.masks.base import unwrap
from prune.runs.loading import load_model
from prune.structural.config import FFN, HEADS, HIDDEN, LAYERS
from prune.structural.gates import FixedGate, attach_unit_gates, rounded_count
from prune.structural.layout import structure_of
from prune.structural.shrink import HEAD_DIM_KEY, LAYER_SIZES_KEY, shrink
from tests.conftest import make_tiny_gpt2, make_tiny_llama, save_tiny_model

SEQ = 16


def make_tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def make_tiny_qwen2():
    """Qwen2: biases on q/k/v only, and per-layer `layer_types` that a dropped layer must leave."""
    torch.manual_seed(4)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return Qwen2ForCausalLM(config).eval()


def make_tiny_mistral():
    torch.manual_seed(5)
    config = MistralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
    )
    return MistralForCausalLM(config).eval()


MODELS = {
    "llama": make_tiny_llama,
    "tied_llama": make_tied_llama,
    "gpt2": make_tiny_gpt2,
    "qwen2": make_tiny_qwen2,
    "mistral": make_tiny_mistral,
}


def random_gates(kinds, seed=0, uniform=False, scale=True):
    """make_gate for attach_unit_gates: random fixed decisions (at least one head unit per layer), random scales."""
    generator = torch.Generator().manual_seed(seed)

    def make(kind, size, layer):
        if kind not in kinds:
            return None
        if uniform and kind in (HEADS, FFN, HIDDEN):  # HIDDEN: 40 of 64, a multiple of the kept query heads
            keep = torch.zeros(size, dtype=torch.bool)
            keep[torch.randperm(size, generator=generator)[: 40 if kind == HIDDEN else max(1, size // 2)]] = True
        else:
            keep = torch.rand(size, generator=generator) < 0.6
            if kind == HEADS:
                keep[0] = True
        if kind == LAYERS:
            keep = torch.tensor([layer != 1])
        values = 0.5 + torch.rand(size, generator=generator) if scale else None
        return FixedGate(kind, keep, layer, scale=values)

    return make


def gated_and_exported(model, kinds, **options):
    structure = structure_of(model)
    gates = attach_unit_gates(model, structure, random_gates(kinds, **options))
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gated = model(input_ids=ids).logits
    counts, decisions = gates.counts(), gates.decisions()
    unwrap(model)
    exported = shrink(model, structure, decisions)
    with torch.no_grad():
        logits = exported(input_ids=ids).logits
    return structure, counts, gated, exported, logits, ids


@pytest.mark.parametrize("family", list(MODELS))
def test_size_arithmetic_matches_the_counted_params_and_flops(family):
    model = MODELS[family]()
    structure = structure_of(model)
    full = structure.full_counts()
    assert structure.size(full, "params") == count_params(model).total
    assert structure.size(full, "flops", SEQ) == count_flops(model, SEQ).dense


@pytest.mark.parametrize("family", list(MODELS))
def test_exported_logits_equal_the_gated_hard_mask_logits_with_every_unit_kind(family):
    structure, counts, gated, exported, logits, _ = gated_and_exported(MODELS[family](), {HEADS, FFN, HIDDEN, LAYERS})
    assert (logits - gated).abs().max().item() < 1e-4
    assert count_params(exported).total == structure.size(counts, "params")
    assert count_flops(exported, SEQ).dense == structure.size(counts, "flops", SEQ)
    assert count_params(exported).total < structure.size(structure.full_counts(), "params")


def test_export_shape_arithmetic_per_unit_kind():
    r, hd = 2, 16  # tiny Llama: 4 query heads over 2 key/value heads of 16 dims, 128 neurons, width 64
    for kind in (HEADS, FFN, HIDDEN, LAYERS):
        model = make_tiny_llama()
        structure = structure_of(model)
        gates = attach_unit_gates(model, structure, random_gates({kind}, seed=5))
        counts, decisions = gates.counts(), gates.decisions()
        unwrap(model)
        new = shrink(model, structure, decisions)
        layers = new.model.layers
        d = counts.hidden
        assert new.model.embed_tokens.weight.shape == (128, d) and new.model.norm.weight.shape == (d,)
        assert len(layers) == sum(counts.layers)
        kept = [i for i, keep in enumerate(counts.layers) if keep]
        for layer, index in zip(layers, kept):
            g, f = counts.heads[index], counts.ffn[index]
            attn, mlp = layer.self_attn, layer.mlp
            assert attn.q_proj.weight.shape == (g * r * hd, d)
            assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (g * hd, d)
            assert attn.o_proj.weight.shape == (d, g * r * hd)
            assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (f, d)
            assert mlp.down_proj.weight.shape == (d, f)
            assert layer.input_layernorm.weight.shape == (d,)
        if kind == HEADS:  # every layer stays a valid GQA attention: r query heads per key/value head
            config = new.config
            sizes = getattr(config, LAYER_SIZES_KEY, None) or [
                {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads}
            ]
            assert all(size["heads"] == r * size["kv_heads"] for size in sizes)
        if kind == HIDDEN:
            assert d < 64 and new.config.hidden_size == d and new.config.head_dim == hd


def test_gpt2_export_shapes_keep_qkv_segments_and_record_head_dim():
    _, counts, _, exported, _, _ = gated_and_exported(make_tiny_gpt2(), {HEADS, FFN})
    for block, g, f in zip(exported.transformer.h, counts.heads, counts.ffn):
        assert block.attn.c_attn.weight.shape == (64, 3 * g * 16)  # Conv1D: [in, out] = q|k|v of the kept heads
        assert block.attn.c_proj.weight.shape == (g * 16, 64)
        assert block.mlp.c_fc.weight.shape == (64, f) and block.mlp.c_proj.weight.shape == (f, 64)
    assert getattr(exported.config, HEAD_DIM_KEY) == 16


def test_uniform_export_loads_with_plain_transformers(tmp_path):
    model = make_tiny_llama()
    _, _, gated, exported, _, ids = gated_and_exported(model, {HEADS, FFN, HIDDEN}, uniform=True)
    assert not hasattr(exported.config, LAYER_SIZES_KEY)
    exported.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert (again - gated).abs().max().item() < 1e-4
    assert reloaded.config.num_key_value_heads == 1 and reloaded.config.intermediate_size == 64


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_layer_sizes_load_with_prune_models_load_in_one_line(tmp_path, family):
    source = save_tiny_model(tmp_path / "base", family)
    model, tokenizer = load_model(str(source))
    _, _, gated, exported, _, ids = gated_and_exported(model, {HEADS, FFN, HIDDEN})
    assert getattr(exported.config, LAYER_SIZES_KEY)  # the two layers differ
    exported.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    reloaded, _ = load_model(str(tmp_path / "pruned"))
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert (again - gated).abs().max().item() < 1e-4
    assert count_params(reloaded).total == count_params(exported).total
    with pytest.raises(RuntimeError, match="mismatched"):  # plain transformers cannot build layers of different sizes
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")


def test_unknown_architecture_names_the_supported_families_and_how_to_add_one():
    config = OPTConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        ffn_dim=64,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    with pytest.raises(UserInputError) as error:
        structure_of(OPTForCausalLM(config))
    message = str(error.value)
    assert "opt" in message and "Llama-style" in message and "GPT-2" in message and "To add a family" in message


def test_rounded_counts():
    assert rounded_count(70, 64, 128) == 64
    assert rounded_count(100, 64, 128) == 128
    assert rounded_count(0, 8, 128) == 0
    assert rounded_count(3, 8, 128) == 8
    assert rounded_count(125, 8, 130) == 128
    assert rounded_count(130, 8, 130) == 130  # nothing pruned stays unpruned
