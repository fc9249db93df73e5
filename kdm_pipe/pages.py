"""The HTML kit every page of kdm-pipe is built from (run reports, the comparison page, the filter report).

Plain HTML with one inline stylesheet: no scripts, no external fonts or CSS, every text escaped. Figures are PNGs
beside the page, linked by relative paths.
"""

from __future__ import annotations

import math
import os
from html import escape
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

STYLE = """body{font-family:sans-serif;max-width:75em;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{background:#eee}img{max-width:100%}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}figcaption{font-size:90%;color:#555}
.note{color:#666}.warn{color:#a40}table.kv td{text-align:left}table.kv th{white-space:nowrap;text-align:left}"""


def fmt(value: Any, digits: int = 4) -> str:
    """The one number format of every table and line: `digits` significant digits, thousands separators, no trailing
    zeros, and scientific notation only outside 1e-4 ≤ |x| < 1e15 (8,433 and 16,040, not 8433 and 1.604e+04);
    integers in full; None as an empty cell; anything else as str()."""
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    if not isinstance(value, (float, np.floating)):
        return str(value)
    short = f"{float(value):.{digits}g}"
    rounded = float(short)
    if not math.isfinite(rounded) or rounded == 0 or not 1e-4 <= abs(rounded) < 1e15:
        return short
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    text = f"{rounded:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str | None = None) -> str:
    """A table whose first column names the row; cells are formatted with `fmt` and escaped. `cls="kv"`: a table of
    settings (text left-aligned, names unbroken)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{escape(fmt(c))}</{'th' if i == 0 else 'td'}>"
                                    for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{escape(title)}</h1>\n{body}</body>\n</html>\n")


def section(title: str, *parts: str) -> str:
    return f"<h2>{escape(title)}</h2>\n" + "".join(parts)


def para(text: str, cls: str | None = None) -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<p{attr}>{escape(text)}</p>\n"


def figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{escape(src)}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>\n")


def link(href: str, text: str) -> str:
    return f'<a href="{escape(href)}">{escape(text)}</a>'


def relative(path: Path, base: Path) -> str | None:
    """`path` as a URL relative to the directory `base`, or None if the file is missing."""
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix() if path.is_file() else None
