"""Text corpora -> one token stream -> a train/calibration part and a held-out part that can never overlap.

Sources: `embedded-docs` (the documentation text shipped inside CPython, so there is always a corpus offline),
local `.txt` / `.jsonl` / `.json` / `.parquet` files, and Hub datasets (`wikitext`, `c4` or any name).

How the split works: documents are joined with "\\n\\n" and tokenized in one go into a single stream. The held-out
part is the LAST `heldout_fraction` of that stream and the train/calibration part is everything before it. Both are
contiguous slices on either side of one cut, so no token (hence no block) is in both, and together they are the
whole stream. The split depends only on the text and the tokenizer: the same every run. Alternatively, for Hub
datasets, `heldout_split` (e.g. wikitext's "test") supplies the held-out stream from a separate split; then the
dataset's own split is what keeps them apart.

Blocks are consecutive, non-overlapping `seq_len` windows of a part (the remainder is dropped); calibration
draws `n` distinct blocks from the train part with a seeded generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from prune.core import hub
from prune.core.config import StrictConfig
from prune.core.errors import UserInputError

EMBEDDED_DOCS = "embedded-docs"
_FILE_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_OFFLINE_HINT = f"pass a local .txt/.jsonl/.parquet file or `{EMBEDDED_DOCS}`"
# Pinned configs so that "wikitext" means the same text everywhere.
_WIKITEXT = {"path": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "train"}
# C4 is 300+ GB; the usual calibration practice reads a single shard of the English config.
_C4_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


class DataConfig(StrictConfig):
    """The `data` section for a causal LM: where the text comes from and how it is cut."""

    source: str = Field(EMBEDDED_DOCS, description="embedded-docs, a hub dataset name, or a local file")
    config: str | None = Field(None, description="hub dataset configuration, e.g. wikitext-2-raw-v1")
    split: str | None = Field(None, description="hub dataset split for calibration/training")
    heldout_split: str | None = Field(None, description="separate hub split for evaluation (else the tail)")
    text_column: str = Field("text", description="the column holding the text in a dataset or .jsonl/.parquet file")
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="tail of the token stream held out")
    calibration_samples: int = Field(128, ge=1, description="blocks of seq_len tokens drawn (seeded) for calibration")
    seq_len: int = Field(512, ge=8, description="tokens per block, for calibration, training and evaluation")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of the training blocks a learnable method "
                            "trains on (seeded; VTrans' Fast variant uses a small share)")


def load_documents(source: str, *, config: str | None = None, split: str | None = None,
                   text_column: str = "text") -> list[str]:
    """The documents of `source`, in a fixed order.

    A `.txt` file is ONE document, kept verbatim: the stream is then exactly the file, so the held-out text is
    exactly its tail (splitting on blank lines and re-joining with "\\n\\n" would only normalise whitespace).
    """
    kind = _source_kind(source)
    if kind == "embedded":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    if kind == "file":
        return _file_documents(Path(source).expanduser(), text_column)
    return _hub_documents(source, config, split, text_column)


def _source_kind(source: str) -> str:
    if source == EMBEDDED_DOCS:
        return "embedded"
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in _FILE_SUFFIXES or not hub.looks_like_hub_id(source):
        return "file"
    return "hub"


def _file_documents(path: Path, text_column: str) -> list[str]:
    if not path.is_file():
        raise UserInputError(
            f"no such file {str(path)!r}; pass an existing .txt/.jsonl/.json/.parquet file, a Hub dataset name "
            f"(wikitext, c4, org/name) or `{EMBEDDED_DOCS}`."
        )
    builder = _FILE_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise UserInputError(f"{str(path)!r}: unsupported file type; use one of {', '.join(_FILE_SUFFIXES)}.")
    if builder == "text":
        return [path.read_text(encoding="utf-8")]
    import datasets

    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:
        raise UserInputError(f"could not read {str(path)!r} as {builder}: {err}; check the file's format.") from err
    return _column(table, text_column, str(path))


def _hub_documents(name: str, config: str | None, split: str | None, text_column: str) -> list[str]:
    hub.require_hub(f"the dataset {name!r}", _OFFLINE_HINT)
    import datasets

    kwargs: dict = {}
    if name == "wikitext":
        name, config, split = _WIKITEXT["path"], config or _WIKITEXT["config"], split or _WIKITEXT["split"]
    elif name == "c4":
        split = split or "validation"
        if config not in (None, "en") or split not in _C4_SHARDS:
            raise UserInputError(
                f"c4 is read from one shard of the 'en' config, splits {sorted(_C4_SHARDS)}; got config={config!r}, "
                f"split={split!r}. For other C4 configs pass name='allenai/c4' with your own config."
            )
        name, config, kwargs = "allenai/c4", None, {"data_files": {split: _C4_SHARDS[split]}}
    try:
        table = datasets.load_dataset(name, config, split=split or "train", **kwargs)
    except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:
        raise UserInputError(
            f"could not load the dataset {name!r} (config={config!r}, split={split or 'train'!r}): {err}; "
            f"check the name, config and split, or {_OFFLINE_HINT}."
        ) from err
    return _column(table, text_column, name)


def _column(table, text_column: str, where: str) -> list[str]:
    if text_column not in table.column_names:
        raise UserInputError(
            f"{where} has no column {text_column!r}; its columns are {table.column_names}. "
            "Set text_column to the one holding the text."
        )
    return [text for text in table[text_column] if text is not None]


def tokenize(tokenizer, documents: list[str]) -> torch.Tensor:
    """Join with "\\n\\n" and tokenize once, without added special tokens: a pure text stream (1-D LongTensor)."""
    text = "\n\n".join(documents)
    if not text.strip():
        raise UserInputError("the corpus is empty; pass a source that holds text.")
    # verbose=False: the stream is longer than model_max_length on purpose; it is cut into blocks later.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def token_blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[n, seq_len] consecutive non-overlapping windows of the 1-D `ids`; the remainder is dropped (n may be 0)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UserInputError(f"seq_len must be a positive integer, got {seq_len!r}.")
    n = ids.numel() // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


@dataclass(frozen=True)
class TokenSplits:
    """The train/calibration token stream and the held-out stream (both 1-D LongTensors, disjoint)."""

    train_ids: torch.Tensor
    heldout_ids: torch.Tensor

    blocks = staticmethod(token_blocks)

    def train_blocks(self, seq_len: int) -> torch.Tensor:
        return _nonempty_blocks(self.train_ids, seq_len, "training")

    def heldout_blocks(self, seq_len: int) -> torch.Tensor:
        return _nonempty_blocks(self.heldout_ids, seq_len, "held-out")

    def calibration_blocks(self, n: int, seq_len: int, seed: int) -> torch.Tensor:
        """`n` distinct blocks of the train part, chosen by a generator seeded with `seed`: the same every run."""
        blocks = token_blocks(self.train_ids, seq_len)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserInputError(f"the number of calibration blocks must be a positive integer, got {n!r}.")
        if n > blocks.shape[0]:
            raise UserInputError(
                f"{n} calibration blocks of {seq_len} tokens were asked for, but the training part "
                f"({self.train_ids.numel()} tokens) holds only {blocks.shape[0]}; ask for at most "
                f"{blocks.shape[0]}, shorten seq_len, or use a larger corpus."
            )
        generator = torch.Generator().manual_seed(seed)
        return blocks[torch.randperm(blocks.shape[0], generator=generator)[:n]]

    def heldout_text(self, tokenizer) -> str:
        """The held-out part as text, e.g. to build accuracy tasks from text the masks never saw."""
        return tokenizer.decode(self.heldout_ids.tolist())


def _nonempty_blocks(ids: torch.Tensor, seq_len: int, part: str) -> torch.Tensor:
    blocks = token_blocks(ids, seq_len)
    if blocks.shape[0] == 0:
        raise UserInputError(
            f"the {part} part has {ids.numel()} tokens, fewer than seq_len={seq_len}; shorten seq_len or use a "
            "larger corpus (or a larger heldout_fraction for the held-out part)."
        )
    return blocks


def split_tokens(ids, heldout_fraction: float) -> TokenSplits:
    """Cut the stream once: everything before the cut trains/calibrates, the last `heldout_fraction` is held out."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1:
        raise UserInputError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}.")
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
            or not 0.0 < heldout_fraction < 1.0:
        raise UserInputError(f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction!r}.")
    n_heldout = round(ids.numel() * heldout_fraction)
    if n_heldout < 1 or n_heldout >= ids.numel():
        raise UserInputError(
            f"a stream of {ids.numel()} tokens with heldout_fraction={heldout_fraction} leaves one part empty; "
            "use a larger corpus or a fraction nearer 0.5."
        )
    cut = ids.numel() - n_heldout
    return TokenSplits(train_ids=ids[:cut].clone(), heldout_ids=ids[cut:].clone())


def prepare(tokenizer, source: str, *, config: str | None = None, split: str | None = None,
            heldout_split: str | None = None, text_column: str = "text",
            heldout_fraction: float = 0.1) -> TokenSplits:
    """Load, tokenize and split `source`; with `heldout_split` (Hub datasets only) that split is held out whole."""
    if heldout_split is not None:
        if _source_kind(source) != "hub":
            raise UserInputError(
                f"heldout_split applies to Hub datasets only; for {source!r} leave it unset and the last "
                "heldout_fraction of the text is held out."
            )
        if heldout_split == (split or _default_split(source)):
            raise UserInputError(f"heldout_split {heldout_split!r} is the training split too; pick another split.")
    documents = load_documents(source, config=config, split=split, text_column=text_column)
    if heldout_split is None:
        return split_tokens(tokenize(tokenizer, documents), heldout_fraction)
    heldout = load_documents(source, config=config, split=heldout_split, text_column=text_column)
    return TokenSplits(train_ids=tokenize(tokenizer, documents), heldout_ids=tokenize(tokenizer, heldout))


def _default_split(source: str) -> str:
    return {"wikitext": _WIKITEXT["split"], "c4": "validation"}.get(source, "train")
