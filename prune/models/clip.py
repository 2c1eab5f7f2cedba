"""Load a CLIP model with its processor (tokenizer + image processor): an alias, a local directory or a Hub id.

`clip-tiny-random` is a small CLIP built from a config with seeded random weights and a byte-level tokenizer
(every string tokenizes, so any class names work), created once under the MaskPrune cache and then loaded like
any saved checkpoint. It needs nothing but the installed packages, so tests and the offline recipe run with no
Hub access; it is a random model, so its zero-shot accuracy sits at chance and only mask tuning can lift it.
Hub ids (`openai/clip-vit-base-patch16`) load from the Hugging Face cache first and the Hub only if it answers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, CLIPModel, ProcessorMixin

from prune.core.atomic import staged_directory
from prune.core.errors import UserInputError
from prune.models.loading import cache_root, from_dir_or_hub

TINY_CLIP = "clip-tiny-random"
_OFFLINE_HINT = f"pass a local CLIP directory saved with save_pretrained, or the alias `{TINY_CLIP}`"
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def load_clip(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[CLIPModel, ProcessorMixin]:
    """(CLIPModel in eval mode, processor with `.tokenizer` and `.image_processor`) for an alias, dir or Hub id."""
    if name_or_path == TINY_CLIP:
        directory = cache_root() / "models" / TINY_CLIP
        if not (directory / "config.json").is_file():
            make_tiny_clip(directory)
        return _from_pretrained(str(directory), dtype)
    kinds = (
        f"a CLIP directory saved with save_pretrained, a Hub id such as openai/clip-vit-base-patch16, or the "
        f"alias `{TINY_CLIP}`"
    )
    return from_dir_or_hub(name_or_path, dtype, _from_pretrained, kinds, _OFFLINE_HINT)


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs) -> tuple[CLIPModel, ProcessorMixin]:
    model_type = AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs).model_type
    if model_type != "clip":
        raise UserInputError(
            f"{source!r} is a {model_type!r} model; task zero-shot-classification needs a CLIP model "
            "(vision + text towers, e.g. openai/clip-vit-base-patch16). For a causal LM use task: causal-lm."
        )
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=False, **kwargs)
    model = CLIPModel.from_pretrained(source, dtype=dtype, trust_remote_code=False, **kwargs)
    return model.eval(), processor


def make_tiny_clip(directory: Path, seed: int = 0) -> None:
    """Build the tiny random CLIP and its processor and save them at `directory` (atomically: staged, renamed)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPProcessor, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols: every string tokenizes
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    bos, eos = vocab.setdefault(_BOS, len(vocab)), vocab.setdefault(_EOS, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A {_EOS}", special_tokens=[(_BOS, bos), (_EOS, eos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=_BOS, eos_token=_EOS, pad_token=_EOS, model_max_length=77
    )
    # The PIL image processor: the same pixels with or without torchvision installed (and no fallback warning).
    image_processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_processor_class(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=64,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with staged_directory(directory, complete=lambda path: (path / "config.json").is_file()) as staging:
        model.save_pretrained(staging)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(staging)
