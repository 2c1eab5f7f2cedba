"""Number formatting and tables (aligned for a terminal, or Markdown), for any report.

Nothing here knows what a report holds, and nothing here writes a file: the caller decides where text goes.
"""

from __future__ import annotations

import math
from typing import Any

_SI = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def format_number(value: Any, *, kind: str | None = None, digits: int = 3) -> str:
    """A short human string for a table cell.

    kind: "flops"/"params"/"si" -> SI suffix ("1.23 G"); "ppl" -> 2 decimals; "pct" -> "12.3%"
    (value is a fraction); "ms" -> 2 decimals; None -> ints with thousands separators, floats with
    `digits` significant digits (SI-suffixed from 1e6 up). None -> "-", NaN/inf -> "nan"/"inf".
    """
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if kind in ("flops", "params", "si"):
        return _si(value, digits)
    if kind == "ppl":
        return f"{value:.2f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "ms":
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) < 1e6 else _si(value, digits)
    if abs(value) >= 1e6:
        return _si(value, digits)
    if value != 0 and abs(value) < 10 ** -(digits + 1):
        return f"{value:.{digits - 1}e}"
    return _sig(value, digits)


def _sig(x: float, digits: int) -> str:
    """`x` with `digits` significant digits in fixed notation (no exponent): 1.23, 12.3, 135."""
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    text = f"{x:.{max(0, digits - 1 - magnitude)}f}"
    rounded = float(text)
    if rounded and math.floor(math.log10(abs(rounded))) > magnitude:  # 9.996 -> 10.00 -> 10.0
        text = f"{rounded:.{max(0, digits - 2 - magnitude)}f}"
    return text


def _si(value: float, digits: int) -> str:
    """`digits` significant digits with an SI suffix: 1.23 G, 12.3 M, 135 M (999.6 k -> 1.00 M)."""
    for i, (scale, suffix) in enumerate(_SI):
        if abs(value) >= scale:
            text = _sig(value / scale, digits)
            if i > 0 and abs(float(text)) >= 1000:
                scale, suffix = _SI[i - 1]
                text = _sig(value / scale, digits)
            return f"{text} {suffix}"
    if isinstance(value, int):
        return str(value)
    text = _sig(value, digits)
    if abs(float(text)) >= 1000:
        return f"{_sig(value / 1e3, digits)} k"
    return text


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else format_number(value)


def _is_numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def render_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """Plain-text table aligned for a terminal: numbers right-aligned, text left-aligned.

    Missing keys print as "-"; non-string values go through `format_number`.
    """
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [any(_is_numeric(row.get(c)) for row in rows) for c in columns]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """GitHub-flavoured Markdown table; numeric columns right-aligned."""
    numeric = [any(_is_numeric(row.get(c)) for row in rows) for c in columns]
    head = "| " + " | ".join(_md_escape(c) for c in columns) + " |"
    sep = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    body = ["| " + " | ".join(_md_escape(_cell(row.get(c))) for c in columns) + " |" for row in rows]
    return "\n".join([head, sep, *body]) + "\n"
