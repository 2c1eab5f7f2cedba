"""Examples for the `docs_lastword` task: LAMBADA-style last-word prediction from held-out prose.

Deterministic: the same text gives the same examples. The text is cut into prose segments
(code-like lines break a segment: a context never spans a code block); in each segment every word
that ends a sentence and is purely alphabetic, >= `min_word_len` letters, is a candidate target.
Its context is the up to `context_words` words before it in the segment (at least
`min_context_words`). Targets are spaced so that no two contexts overlap; at most `max_examples`
are kept, in text order.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

CONTEXT_WORDS = 64
MIN_CONTEXT_WORDS = 16
MAX_EXAMPLES = 500
MIN_WORD_LEN = 3

_CODE_PREFIXES = (">>>", "...", "$ ", "#", "//", "```", ".. ", "{", "}", "@", "|", "=")
_CODE_CHARS = re.compile(r"[{}\[\]<>=;_`\\]|\(\)|::|->|\w\.\w+\(")
_SENTENCE_END = re.compile(r"^([A-Za-z]+)[.!?]$")
_NOT_TARGETS = frozenset({"etc", "e.g", "i.e", "vs", "viz"})


def is_code_like(line: str) -> bool:
    """Heuristic: indented blocks, prompts, markup and symbol-heavy lines are not prose."""
    stripped = line.strip()
    if not stripped:
        return False
    if line.startswith(("    ", "\t")) or stripped.startswith(_CODE_PREFIXES):
        return True
    if _CODE_CHARS.search(stripped):
        return True
    prose_chars = sum(c.isalpha() or c.isspace() or c in ",.;:'\"!?()-" for c in stripped)
    return prose_chars / len(stripped) < 0.9


def _segments(text: str) -> list[list[str]]:
    """Runs of prose words; a code-like line ends the current run (blank lines do not)."""
    segments: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if is_code_like(line):
            if current:
                segments.append(current)
            current = []
        else:
            current.extend(line.split())
    if current:
        segments.append(current)
    return segments


def build_examples(
    text: str,
    *,
    context_words: int = CONTEXT_WORDS,
    min_context_words: int = MIN_CONTEXT_WORDS,
    max_examples: int = MAX_EXAMPLES,
    min_word_len: int = MIN_WORD_LEN,
) -> list[dict[str, str]]:
    """`[{"context": str, "target": str}, ...]`: the target is the sentence-final word (no
    punctuation, no leading space) that follows the context in the text."""
    if context_words < 1 or not 1 <= min_context_words <= context_words:
        raise ValueError("need 1 <= min_context_words <= context_words")
    examples: list[dict[str, str]] = []
    for words in _segments(text):
        next_allowed = min_context_words
        for i in range(min_context_words, len(words)):
            if i < next_allowed:
                continue
            match = _SENTENCE_END.match(words[i])
            if not match:
                continue
            word = match.group(1)
            if len(word) < min_word_len or word.lower() in _NOT_TARGETS:
                continue
            context = words[max(0, i - context_words) : i]
            examples.append({"context": " ".join(context), "target": word})
            if len(examples) >= max_examples:
                return examples
            next_allowed = i + 1 + context_words  # the next context starts after this target
    return examples


def write_jsonl(examples: list[dict[str, str]], path: str | os.PathLike) -> Path:
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    return path
