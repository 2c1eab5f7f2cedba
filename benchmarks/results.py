"""benchmarks/RESULTS.md is shared by every benchmark: each owns one section between markers."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section was written by the script it names, with the exact command.\n"


def write_section(name: str, body: str) -> Path:
    """Replace (or append) the section `name`, leaving every other section as it was."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
    return RESULTS


def interval(value: float, ci95) -> str:
    """'13.50 [12.91, 14.12]': a perplexity and its 95% bootstrap interval, as every section prints them."""
    low, high = ci95
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def labelled(row: dict, name: str | None) -> str:
    """The perplexity of the text `name` (None: the in-domain test part) in a `prune compare` row, with its interval
    and the run's label for that text, taken from the run's report.json (`data.seen`, derived from the recipe's
    data.source and data.mix): '16.05 [13.39, 19.50] (seen)'; no label for the dense model, which read nothing."""
    from prune.sweep.compare import seen_of, text_keys

    keys = text_keys(name)
    return interval(row[keys["value"]], row[keys["ci95"]]) + seen_label(seen_of(row, name))


def seen_in_report(report: dict, texts, docs: str) -> dict[str, bool]:
    """Each text's seen flag from a run's report.json (`data.seen`, derived by prune.data.seen from the recipe's
    data.source and data.mix); `docs` is the name the caller gives the run's own text (its data.source)."""
    data = report["data"]
    return {text: data["seen"][data["source"] if text == docs else text] for text in texts}


def seen_label(seen: bool | None) -> str:
    """' (seen)' / ' (not seen)': a cell's label for one text (prune.data.seen); '' when unknown (the dense model).
    Benchmarks that measure in-process (no report.json) derive it with prune.data.seen.seen_texts from the data
    their own calibration or training read."""
    from prune.data.seen import NOT_SEEN
    from prune.sweep.compare import SEEN_SHORT

    return "" if seen is None else f" ({SEEN_SHORT if seen else NOT_SEEN})"
