import math

import pytest
import torch
import transformers
from torch import nn

from eval.flops import FlopCount, count_flops, count_params, nm_pattern
from eval.latency import LatencyResult, measure_latency

V, D, H = 50, 16, 32


class TwoLinear(nn.Module):
    """Embedding -> Linear(D, H) -> Linear(H, V): every FLOP is in the two matmuls."""

    def __init__(self, bias=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.up = nn.Linear(D, H, bias=bias)
        self.out = nn.Linear(H, V, bias=bias)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids):
        return self.out(torch.relu(self.up(self.emb(input_ids))))


def tiny_llama(**kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=128,
        **kw,
    )
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def mask_2_4(weight_out_in: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive inputs."""
    out, inp = weight_out_in.shape
    groups = weight_out_in.abs().reshape(out, inp // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
    return mask.reshape(out, inp)


@pytest.mark.parametrize("bias", [False, True])
def test_dense_flops_are_2_in_out_tokens(bias):
    model = TwoLinear(bias=bias)
    batch, seq = 3, 7
    res = count_flops(model, seq_len=seq, batch_size=batch)
    tokens = batch * seq
    assert isinstance(res, FlopCount)
    assert res.by_module == {"up": 2 * D * H * tokens, "out": 2 * H * V * tokens}
    assert res.dense == 2 * tokens * (D * H + H * V)
    assert res.sparse == res.dense
    assert res.semi_structured is None


def test_zeroing_half_a_linear_halves_its_sparse_flops():
    model = TwoLinear()
    with torch.no_grad():
        model.up.weight[: H // 2].zero_()  # half the rows: unstructured from an N:M point of view
    res = count_flops(model, seq_len=5)
    up = res.by_module["up"]
    assert res.dense == 2 * 5 * (D * H + H * V)  # zeros do not change what the dense counter sees
    assert res.sparse == res.dense - up // 2
    assert res.semi_structured is None  # rows with 4/4 nonzero: not N:M


def test_2_4_masked_linear_reports_half_as_semi_structured():
    model = TwoLinear()
    with torch.no_grad():
        model.out.weight.mul_(mask_2_4(model.out.weight))
    res = count_flops(model, seq_len=4, batch_size=2)
    out = res.by_module["out"]
    assert res.nm_patterns == {"out": (2, 4)}
    assert res.semi_structured == res.dense - out // 2
    assert res.sparse == res.dense - out // 2


def test_nm_pattern_detection():
    w = torch.randn(8, 16)
    assert nm_pattern(w) is None  # dense
    w24 = w * mask_2_4(w)
    assert nm_pattern(w24) == (2, 4)
    w24[0, 0:4] = 0  # sparser group still satisfies <= 2 of 4
    assert nm_pattern(w24) == (2, 4)
    w14 = torch.zeros(8, 16)
    w14[:, ::4] = 1.0
    assert nm_pattern(w14) == (1, 4)
    assert nm_pattern(torch.randn(8, 6)) is None  # input dim not a multiple of 4 or 8
    w48 = torch.randn(4, 8)
    w48[:, 4:] = 0  # 4 of 8, but 4 of 4 in the first half: 4:8 only
    assert nm_pattern(w48) == (4, 8)


def test_llama_counts_linears_plus_attention_and_names_modules():
    model = tiny_llama()
    b, s = 2, 8
    res = count_flops(model, seq_len=s, batch_size=b)
    linears = sum(res.by_module.values())
    assert res.by_module["model.layers.0.self_attn.q_proj"] == 2 * b * s * 64 * 64
    assert res.by_module["model.layers.1.self_attn.k_proj"] == 2 * b * s * 64 * 32  # GQA: 2 kv heads
    assert res.by_module["lm_head"] == 2 * b * s * 64 * 100
    # Attention scores and weighted sum, 2 layers x 2 bmm of 2*b*heads*s*s*head_dim each (also on CPU).
    attention = 2 * 2 * (2 * b * 4 * s * s * 16)
    assert res.dense == linears + attention


def test_gpt2_conv1d_is_treated_as_linear_with_input_along_dim0():
    model = tiny_gpt2()
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D, weight [in=32, out=128]
    with torch.no_grad():
        conv.weight.mul_(mask_2_4(conv.weight.t()).t())
    res = count_flops(model, seq_len=6)
    name = "transformer.h.0.mlp.c_fc"
    assert res.by_module[name] == 2 * 6 * 32 * 128
    assert res.nm_patterns == {name: (2, 4)}
    assert res.semi_structured == res.dense - res.by_module[name] // 2


def test_count_params_counts_tied_weights_once_and_zeros():
    tied = tiny_llama(tie_word_embeddings=True)
    untied = tiny_llama(tie_word_embeddings=False)
    embed = 100 * 64
    assert count_params(untied).total - count_params(tied).total == embed
    gpt2 = tiny_gpt2()
    pc = count_params(gpt2)
    assert pc.total == sum(p.numel() for p in gpt2.parameters())
    assert pc.nonzero == sum(int(torch.count_nonzero(p)) for p in gpt2.parameters())  # biases start at 0
    with torch.no_grad():
        gpt2.transformer.h[0].mlp.c_fc.weight[:10].zero_()
    after = count_params(gpt2)
    assert after.total == pc.total and after.nonzero == pc.nonzero - 10 * 128
    assert 0 < after.sparsity < 1


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_latency_returns_positive_finite_numbers(make):
    model = make()
    res = measure_latency(model, prompt_len=8, decode_tokens=3, repeats=2, warmup=1)
    assert isinstance(res, LatencyResult)
    for value in (res.prefill_tokens_per_s, res.decode_ms_per_token):
        assert math.isfinite(value) and value > 0
