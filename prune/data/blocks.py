"""Calibration blocks from text the caller holds (the Python API): a list of strings or a `datasets.Dataset`.

The texts are joined and tokenized into one stream, cut into consecutive `seq_len` windows and drawn with a seeded
generator: the rule by which `prune run` draws its calibration blocks from a source's train part
(prune.data.text), so the same text, tokenizer and seed give the same blocks either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prune.core.config import INT64
from prune.core.errors import UserInputError, described
from prune.data.text import draw_blocks, tokenize


def texts_of(dataset, text_column: str = "text", argument: str = "dataset") -> list[str]:
    """The documents of a `datasets.Dataset` (its `text_column`) or of a list of strings, checked; `argument` is
    how errors name what was passed."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        raise UserInputError(
            f"{argument} is a DatasetDict with splits {sorted(dataset)}; pass one split, e.g. {argument}=ds['train']."
        )
    if isinstance(dataset, datasets.Dataset):
        if text_column not in dataset.column_names:
            raise UserInputError(
                f"{argument} has no column {text_column!r}; its columns are {dataset.column_names}. Pass "
                "text_column= naming the one that holds the text."
            )
        return [text for text in dataset[text_column] if text is not None]
    if isinstance(dataset, str):
        raise UserInputError(
            f"{argument} is the string {dataset[:60]!r}; pass a list of strings ([text] for one text), a "
            "datasets.Dataset (e.g. datasets.load_dataset(...)['train']) or token blocks."
        )
    if not isinstance(dataset, Sequence) or not all(isinstance(text, str) for text in dataset):
        raise UserInputError(
            f"{argument} must be a list of strings or a datasets.Dataset, got {described(dataset)}; token ids go "
            "in as a 2-D integer tensor."
        )
    return list(dataset)


def calibration_blocks(
    tokenizer, texts, samples: int, seq_len: int, seed: int = 0, text_column: str = "text"
) -> torch.Tensor:
    """`samples` distinct blocks of `seq_len` tokens, [samples, seq_len], from `texts` (a list of strings or a
    datasets.Dataset, whose `text_column` holds the text), drawn with a generator seeded with `seed`: the same
    every call. What `prune.attach(..., calibration=)` takes for wanda, sparsegpt and the activation scores."""
    if not callable(tokenizer):
        raise UserInputError(
            f"tokenizer must be a Hugging Face tokenizer, got {described(tokenizer)}; e.g. the one "
            "prune.load_model returns, or AutoTokenizer.from_pretrained(...)."
        )
    for name, value in (("samples", samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name} must be a positive integer, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < INT64:
        raise UserInputError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}.")
    return draw_blocks(tokenize(tokenizer, texts_of(texts, text_column, "texts")), samples, seq_len, seed, "the text")
