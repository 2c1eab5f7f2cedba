import math

import pytest
import torch
import transformers

from eval.flops import count_flops
from eval.metric_errors import NonFiniteError
from eval.perplexity import NLL_CHUNK, PerplexityResult, perplexity, window_nll

V = 97


def tiny_llama(**kw) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        max_position_embeddings=128,
        **kw,
    )
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def blocks(n=3, seq_len=17, seed=1):
    return torch.randint(0, V, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def test_uniform_logits_give_vocab_size_and_exact_token_count():
    model = tiny_llama(tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0 -> uniform over the vocabulary
    res = perplexity(model, blocks(n=3, seq_len=17), batch_size=2)
    assert isinstance(res, PerplexityResult)
    assert res.value == pytest.approx(V, rel=1e-5)
    assert res.nll == pytest.approx(math.log(V), rel=1e-6)
    assert res.tokens == 3 * 16
    assert res.windows == 3


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_matches_model_loss_and_batch_size_invariant(make):
    model = make()
    data = blocks(n=4, seq_len=12)
    res1 = perplexity(model, data, batch_size=1)
    res3 = perplexity(model, data, batch_size=3)
    assert res1.value == pytest.approx(res3.value, rel=1e-5)
    # Unpadded equal-length rows: the model's own mean loss agrees with our sum / count.
    model.eval()  # perplexity() restored the mode it found; GPT-2 has dropout
    with torch.no_grad():
        loss = model(input_ids=data, labels=data).loss.item()
    assert res1.nll == pytest.approx(loss, rel=1e-5)
    assert 1.0 < res1.value < 10 * V  # a random model is near-uniform, not degenerate


def test_per_window_sums_are_each_windows_own_nll_in_row_order():
    model = tiny_llama()
    data = blocks(n=4, seq_len=12)
    res = perplexity(model, data, batch_size=3)
    assert len(res.window_nll) == 4 and res.window_tokens == (11, 11, 11, 11)
    for row, row_nll in zip(data, res.window_nll):  # each window alone gives back its own sum
        assert perplexity(model, row[None]).nll * 11 == pytest.approx(row_nll, rel=1e-6)
    assert sum(res.window_nll) / sum(res.window_tokens) == pytest.approx(res.nll, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_nll_in_chunks_equals_one_cross_entropy_bit_for_bit(dtype):
    """window_nll scores NLL_CHUNK positions at a time (memory); the sums are those of one call over the window."""
    generator = torch.Generator().manual_seed(0)
    for rows, seq_len in ((1, 2 * NLL_CHUNK + 7), (3, NLL_CHUNK + 1), (2, NLL_CHUNK), (2, 5)):
        logits = (torch.randn(rows, seq_len, V, generator=generator) * 3).to(dtype)
        batch = torch.randint(0, V, (rows, seq_len), generator=generator)
        whole = torch.nn.functional.cross_entropy(
            logits.float()[:, :-1].reshape(-1, V), batch[:, 1:].reshape(-1), reduction="none"
        )
        expected = whole.view(rows, seq_len - 1).sum(dim=1, dtype=torch.float64)
        assert torch.equal(window_nll(logits, batch), expected)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_whole_window_forwards_build_no_kv_cache(make):
    """Perplexity and FLOPs run each window once and never continue it: the forward is asked for no KV cache (it
    would hold a key and a value per layer and position), and the figures are those of a forward that built one."""
    model = make().eval()
    data = blocks(n=2, seq_len=12)
    seen = []
    handle = model.register_forward_hook(lambda module, args, kwargs, output: seen.append(output), with_kwargs=True)
    try:
        result = perplexity(model, data)
        flops = count_flops(model, 12)
    finally:
        handle.remove()
    assert len(seen) == 3 and all(getattr(output, "past_key_values", None) is None for output in seen)
    with torch.no_grad():
        cached = [model(input_ids=row[None], use_cache=True) for row in data]
    assert all(output.past_key_values is not None for output in cached)  # what the forward builds unasked
    expected = [window_nll(output.logits, row[None]).item() for output, row in zip(cached, data)]
    assert list(result.window_nll) == pytest.approx(expected, rel=1e-6)
    assert flops.dense > 0


class _NoCacheArgument(torch.nn.Module):
    """A model whose forward takes no `use_cache`: perplexity must not pass one."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, V)

    def forward(self, input_ids):
        return self.embed(input_ids)


def test_forward_without_a_cache_argument_is_called_without_one():
    assert perplexity(_NoCacheArgument(), blocks(n=2, seq_len=9)).windows == 2


def test_nan_weights_raise_and_name_the_windows():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"3 of 3 windows"):
        perplexity(model, blocks(n=3, seq_len=9))
    assert issubclass(NonFiniteError, ArithmeticError)


def test_restores_training_mode_and_rejects_bad_input():
    model = tiny_llama()
    model.train()
    perplexity(model, blocks(n=1, seq_len=5))
    assert model.training
    with pytest.raises(ValueError):
        perplexity(model, torch.randint(0, V, (10,)))
    with pytest.raises(ValueError):
        perplexity(model, torch.randint(0, V, (2, 1)))
    with pytest.raises(ValueError):
        perplexity(model, blocks(), batch_size=0)


@pytest.mark.integration
def test_smollm2_perplexity_on_docs_is_low_and_random_init_is_not(smollm2_dir):
    import pydoc_data.topics  # the Python language reference, shipped with CPython

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tok(pydoc_data.topics.topics["assert"] + pydoc_data.topics.topics["if"])["input_ids"]
    data = torch.tensor(ids[: 2 * 128]).view(2, 128)
    real = perplexity(model, data)
    torch.manual_seed(0)
    rand = perplexity(transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32), data)
    assert real.tokens == 2 * 127
    assert 1.5 < real.value < 60
    assert rand.value > 1000  # near-uniform over a 49k vocabulary
