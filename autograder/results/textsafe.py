"""Text from submissions made safe to write: one rule for every CSV, JSON, HTML and terminal writer.

Student-controlled text reaches the results (folder and file names as ``submitted_as``, LMS display
names, error messages and tracebacks in ``reason``, evidence details, re-check notes). Before any of
it is written:

* :func:`clean` removes terminal escape sequences (``ESC [ … final``, ``ESC ] … BEL``/``ESC \\``,
  other ``ESC x``), every other control character (Unicode category ``Cc``: C0, DEL, C1 — newlines
  and tabs too unless ``keep_newlines``), the bidirectional overrides and isolates (U+202A–U+202E,
  U+2066–U+2069: "trojan source" reordering) and lone surrogates;
* :func:`csv_cell` also neutralises spreadsheet formulas: a field that starts with ``=``, ``+``,
  ``-``, ``@``, a tab or a carriage return (the OWASP "CSV injection" list) gets a leading ``'``,
  which spreadsheets show as text and never evaluate;
* :func:`json_safe` cleans every string (and key) of a JSON-able value; :func:`html_text` escapes.

Numbers the grader formats itself (scores, percentages) never start with ``-`` (scores are >= 0),
so applying :func:`csv_cell` to every field of a row changes none of them.
"""
from __future__ import annotations

import html
import re
import unicodedata

_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]"          # CSI: colours, cursor movement, erase
                      r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window title, hyperlinks
                      r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"       # DCS, SOS, PM, APC strings
                      r"|\x1b[@-Z\\-_]"                       # other two-byte escapes
                      r"|\x9b[0-?]*[ -/]*[@-~]")              # 8-bit CSI
_BIDI = dict.fromkeys([*range(0x202A, 0x202F), *range(0x2066, 0x206A)])
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def clean(text, keep_newlines: bool = False) -> str:
    """``text`` as a string without escape sequences, control characters, bidi overrides or surrogates.

    With ``keep_newlines`` a newline survives (for multi-line JSON messages); otherwise newlines and
    tabs become spaces, so one value is one line.
    """
    s = _ESCAPES.sub("", text if isinstance(text, str) else str(text)).translate(_BIDI)
    out = []
    for ch in s:
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif ch in "\n\t\r":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs"):
            continue
        else:
            out.append(ch)
    return "".join(out)


def csv_cell(value) -> str:
    """One CSV field: ``None`` -> "", else :func:`clean` text, prefixed by ``'`` if a spreadsheet
    would read it as a formula."""
    if value is None:
        return ""
    raw = value if isinstance(value, str) else str(value)
    s = clean(raw)
    return "'" + s if (s.startswith(FORMULA_START) or raw.startswith(FORMULA_START)) else s


def csv_row(values) -> list[str]:
    """:func:`csv_cell` of every field of a row."""
    return [csv_cell(v) for v in values]


def json_safe(obj):
    """``obj`` with every string (values and keys, nested) passed through ``clean(keep_newlines=True)``."""
    if isinstance(obj, str):
        return clean(obj, keep_newlines=True)
    if isinstance(obj, dict):
        return {json_safe(k) if isinstance(k, str) else k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def html_text(value) -> str:
    """Text for an HTML page: cleaned, then escaped (``<``, ``>``, ``&``, quotes)."""
    return html.escape(clean("" if value is None else value, keep_newlines=True), quote=True)
