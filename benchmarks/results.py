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
