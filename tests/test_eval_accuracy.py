import math
import random
import time

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from eval.accuracy import accuracy_scores, hub_reachable, local_tasks, task_accuracy
from eval.lastword import CONTEXT_WORDS, build_examples, is_code_like
from eval.metric_errors import TaskUnavailableError

WORDS = "the a cat dog saw ran over under big small red green quick slow house tree river".split()


def prose(n_sentences=400, final=("banana",), seed=0) -> str:
    """Sentences of 6-14 filler words, each ending in one of `final`; some code-like lines between."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        lines.append(" ".join(words).capitalize() + " " + rng.choice(final) + ".")
        if i % 50 == 49:
            lines += ["", ">>> print(x)", "    def f(self): return {'k': 1}", ""]
    return "\n".join(lines) + "\n"


def word_tokenizer(text: str) -> transformers.PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[EOS]": 1, "[PAD]": 2}
    pre = pre_tokenizers.Whitespace()
    for word, _ in pre.pre_tokenize_str(text + " apple banana"):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]"
    )


def tiny_gpt2(vocab_size: int, favour: int | None = None) -> transformers.GPT2LMHeadModel:
    """Random tiny GPT-2; with `favour`, its greedy next token is always that id."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=vocab_size,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    if favour is not None:
        with torch.no_grad():
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.fill_(1.0)  # the final hidden state is all ones
            model.lm_head.weight.zero_()
            model.lm_head.weight[favour] = 1.0  # logit 32 for `favour`, 0 elsewhere
    return model


# ------------------------------------------------------------------------- the example builder
def test_examples_are_deterministic_and_targets_are_sentence_final_words():
    text = prose(final=("banana", "cherry", "mango"))
    a, b = build_examples(text), build_examples(text)
    assert a == b and len(a) > 20
    flat = " ".join(text.split())
    for ex in a:
        assert ex["target"] in ("banana", "cherry", "mango")
        assert f"{ex['context']} {ex['target']}." in flat  # the context ends right before the target
        assert 16 <= len(ex["context"].split()) <= CONTEXT_WORDS
        assert ">>>" not in ex["context"] and "def" not in ex["context"]


def test_examples_do_not_overlap_and_respect_caps():
    text = prose()
    examples = build_examples(text)
    flat = " ".join(line for line in text.splitlines() if not is_code_like(line)).split()
    # Non-overlapping contexts: total context + target words fit in the text.
    assert sum(len(e["context"].split()) + 1 for e in examples) <= len(flat)
    assert len(build_examples(text, max_examples=3)) == 3
    assert build_examples("def f(x):\n    return x\n>>> f(1)\n") == []
    short = build_examples("Too short to count.")
    assert short == []


def test_code_like_lines():
    assert is_code_like("    x = 1")
    assert is_code_like(">>> import os")
    assert is_code_like("result = func(a, b)")
    assert is_code_like("{'a': 1}")
    assert not is_code_like("The interpreter reads the file and executes it.")
    assert not is_code_like("")


# ---------------------------------------------------------------------------- errors, fast
def test_docs_lastword_without_heldout_text_is_a_clear_value_error():
    with pytest.raises(ValueError, match="heldout_text"):
        task_accuracy(object(), object(), ["docs_lastword"])
    with pytest.raises(ValueError, match="heldout_text"):
        task_accuracy(object(), object(), ["docs_lastword"], heldout_text="   ")


def test_local_tasks_listed():
    assert "docs_lastword" in local_tasks()


def test_hub_probe_honours_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    assert hub_reachable() is False
    assert time.perf_counter() - t0 < 0.5


def test_hub_task_offline_fails_fast_with_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without internet
    text = prose()
    tok = word_tokenizer(text)
    model = tiny_gpt2(len(tok))
    t0 = time.perf_counter()
    with pytest.raises(TaskUnavailableError) as info:
        task_accuracy(model, tok, ["docs_lastword", "lambada_openai"], heldout_text=text, limit=2)
    # Indexing lm-eval's ~15k task YAMLs is most of this; the hub is never retried.
    assert time.perf_counter() - t0 < 45
    message = str(info.value)
    assert "lambada_openai" in message and "unreachable" in message and "docs_lastword" in message
    with pytest.raises(TaskUnavailableError, match="unknown task 'no_such_task_xyz'"):
        task_accuracy(model, tok, ["no_such_task_xyz"])
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------ lm-eval end to end
def test_end_to_end_random_tiny_model_scores_near_zero():
    text = prose(final=("banana", "cherry", "mango", "lemon"))
    tok = word_tokenizer(text)
    model = tiny_gpt2(len(tok))
    model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    result = task_accuracy(model, tok, ["docs_lastword"], heldout_text=text, limit=10, batch_size=4)
    assert torch.rand(1) == expected_next  # lm-eval reseeds globally; the caller's RNG is restored
    assert list(result) == ["docs_lastword"]
    assert isinstance(result["docs_lastword"], float)
    assert 0.0 <= result["docs_lastword"] <= 0.3
    assert model.training  # mode restored


def test_lm_evals_environment_probe_is_skipped_and_put_back(monkeypatch):
    """simple_evaluate's add_env_info runs torch's collect_env (pip, nvidia-smi... as subprocesses) for results we
    discard: an evaluation must never reach it, and lm-eval's own function is back in place afterwards."""
    import torch.utils.collect_env
    from lm_eval import evaluator

    probes = []
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: probes.append("probed") or "")
    original = evaluator.add_env_info
    text = prose(final=("banana",))
    tok = word_tokenizer(text)
    assert "docs_lastword" in task_accuracy(tiny_gpt2(len(tok)), tok, ["docs_lastword"], heldout_text=text, limit=4)
    assert probes == [] and evaluator.add_env_info is original
    original({})
    assert probes == ["probed"]  # the spy sits where lm-eval's probe looks


def test_metric_is_real_oracle_scores_one_and_wrong_guesser_zero():
    text = prose(final=("banana",))
    tok = word_tokenizer(text)
    banana, apple = tok.convert_tokens_to_ids("banana"), tok.convert_tokens_to_ids("apple")
    right = task_accuracy(tiny_gpt2(len(tok), favour=banana), tok, ["docs_lastword"], heldout_text=text, limit=8)
    wrong = task_accuracy(tiny_gpt2(len(tok), favour=apple), tok, ["docs_lastword"], heldout_text=text, limit=8)
    assert right == {"docs_lastword": 1.0}
    assert wrong == {"docs_lastword": 0.0}


def test_scores_carry_lm_evals_standard_error_of_the_mean():
    text = prose(final=("banana", "cherry"))
    tok = word_tokenizer(text)
    model = tiny_gpt2(len(tok), favour=tok.convert_tokens_to_ids("banana"))  # right on the banana sentences only
    score = accuracy_scores(model, tok, ["docs_lastword"], heldout_text=text, limit=20)["docs_lastword"]
    p, n = score.value, 20
    assert 0.0 < p < 1.0
    assert score.stderr == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-9)  # sd of 0/1 scores / sqrt(n)
    assert task_accuracy(model, tok, ["docs_lastword"], heldout_text=text, limit=20) == {"docs_lastword": p}


# ------------------------------------------------------------------------- real SmolLM2 (slow)
def _docs_text() -> str:
    import pydoc_data.topics  # the Python language reference, shipped with CPython

    return "\n\n".join(pydoc_data.topics.topics.values())


@pytest.mark.integration
def test_smollm2_scores_far_above_a_random_model(smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    # float32: transformers 5 otherwise loads the checkpoint's bf16, several times slower on CPU
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    text = _docs_text()
    real = task_accuracy(model, tok, ["docs_lastword"], heldout_text=text, limit=40, batch_size=10)
    torch.manual_seed(0)
    random_model = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    rand = task_accuracy(random_model, tok, ["docs_lastword"], heldout_text=text, limit=40, batch_size=10)
    assert real["docs_lastword"] >= 0.2  # measured 0.36 on 100 examples
    assert rand["docs_lastword"] <= 0.05
