"""Make nbgrader's feedback page meet WCAG 2.1 AA (it is what students receive).

nbgrader's feedback template, checked with axe-core, fails four rules: no ``lang`` on ``<html>``
(html-has-lang), code blocks that scroll but cannot get keyboard focus (scrollable-region-focusable),
links told apart from text by colour alone (link-in-text-block), and several Pygments token colours
below 4.5:1 on the code background, as are some ANSI traceback colours (color-contrast).
:func:`make_accessible` fixes them in the generated HTML: it sets ``lang``, gives every ``<pre>``
``tabindex="0"``, underlines links, and adds a copy of the Pygments style (and of the page's ANSI
colours, inline ones included) darkened until each reaches 4.6:1 against the code backgrounds the
template uses. ``tests/test_autograder.py`` runs axe-core on
the feedback pages the suite produces.
"""
from __future__ import annotations

import re
from functools import lru_cache

MARK = "autograder-a11y"
BACKGROUNDS = ("#ffffff", "#f7f7f7", "#f5f5f5", "#eeeeee")
TARGET = 4.6


def _luminance(hex_color: str) -> float:
    h = hex_color.lstrip("#")
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    rgb = [int(h[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(fg: str, bg: str) -> float:
    """WCAG contrast ratio of two ``#rrggbb`` colours."""
    a, b = sorted((_luminance(fg), _luminance(bg)), reverse=True)
    return (a + 0.05) / (b + 0.05)


def darken_until(fg: str, backgrounds=BACKGROUNDS, target: float = TARGET) -> str:
    """``fg`` scaled towards black until its contrast with every background reaches ``target``."""
    h = fg.lstrip("#")
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    rgb = [int(h[i:i + 2], 16) for i in (0, 2, 4)]
    for step in range(101):
        f = 1 - step / 100
        color = "#" + "".join(f"{round(c * f):02x}" for c in rgb)
        if all(contrast(color, bg) >= target for bg in backgrounds):
            return color
    return "#000000"


@lru_cache(maxsize=1)
def accessible_css(style: str = "default") -> str:
    """Pygments ``style`` for ``.highlight`` with every colour made AA-compliant, plus link and focus rules."""
    from pygments.formatters import HtmlFormatter
    defs = HtmlFormatter(style=style).get_style_defs(".highlight")
    rules = []
    for line in defs.splitlines():
        if "color:" not in line or "background" in line.split("{", 1)[0]:
            continue
        fixed = re.sub(r"(?<![-\w])color: (#[0-9a-fA-F]{3,6})", lambda m: f"color: {darken_until(m.group(1))}", line)
        rules.append(fixed.split("/*")[0].strip())
    return "\n".join([
        f"/* {MARK}: WCAG 2.1 AA fixes for the feedback page */",
        "a, a:visited { text-decoration: underline; color: #1f4e79; }",
        ".panel-heading a, .panel-heading a:visited { color: inherit !important; }",
        "pre:focus { outline: 2px solid #1f4e79; }",
        *rules,
    ])


def _rgb_to_hex(m: re.Match) -> str:
    r, g, b = (int(x) for x in m.group(1, 2, 3))
    return f"color: {darken_until(f'#{r:02x}{g:02x}{b:02x}')}"


def _ansi_overrides(html: str) -> list[str]:
    """The page's own ``.ansi-*`` colour rules, darkened (traceback colours in outputs)."""
    out = {}
    for m in re.finditer(r"(\.ansi-[\w-]+-fg)\s*\{\s*color:\s*(#[0-9a-fA-F]{3,6})", html):
        out[m.group(1)] = f"{m.group(1)} {{ color: {darken_until(m.group(2))}; }}"
    return list(out.values())


def make_accessible(html: str, lang: str = "en") -> str:
    """Return ``html`` (an nbgrader feedback page) with the fixes above applied (idempotent)."""
    if MARK in html:
        return html
    html = re.sub(r"<html(?![^>]*\blang=)([^>]*)>", rf'<html lang="{lang}"\1>', html, count=1)
    html = re.sub(r"<pre(?![^>]*\btabindex=)", '<pre tabindex="0"', html)
    html = re.sub(r"color:\s*rgb\((\d+),\s*(\d+),\s*(\d+)\)", _rgb_to_hex, html)   # 256-colour ANSI spans
    css = "\n".join([accessible_css(), *_ansi_overrides(html)])
    style = f'<style type="text/css">\n{css}\n</style>\n'
    if "</head>" in html:
        return html.replace("</head>", style + "</head>", 1)
    return style + html


# Feedback pages are static: no script at all (the page's own MathJax/require.js included), styles
# and images inline only. Sanitizing (nbconvert's sanitize_html) removes the student's scripts; this
# policy is the second wall if something slips through.
CSP = ("default-src 'none'; script-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; "
       "base-uri 'none'; form-action 'none'; frame-src 'none'; object-src 'none'")


def add_csp(html: str) -> str:
    """``html`` with a Content-Security-Policy ``<meta>`` as the first element of ``<head>`` (idempotent)."""
    meta = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
    if meta in html:
        return html
    return re.sub(r"<head(\s[^>]*)?>", lambda m: m.group(0) + "\n" + meta, html, count=1)
