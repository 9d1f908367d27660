"""Figures that are accessible by construction: the container and the helpers every figure uses.

Every plotting function returns an :class:`AccessibleFigure`: the matplotlib Figure, an alt text
that states what the figure shows *in numbers computed from the data* ("the 95 % rank rises from 14
at layer 2 to 81 at layer 25 of 576"), never "a plot of X", and a table (list of dicts) with the
plotted data, so a screen-reader user or a text-only terminal gets the same information.

Design rules, applied in every function below:

* categories use the Okabe-Ito palette (colour-blind safe) **and** differ by marker and line style;
* heatmaps use ``cividis`` (perceptually uniform, readable with red-green colour blindness and in
  grey scale); any category drawn on a heatmap (a severity, a massive activation, a score above a
  baseline) is a *glyph* (marker shape) or a hatch, explained in the legend, never a colour alone;
* titles, axis labels with units, fonts of at least 8 pt;
* bad input: empty records, one layer, one position, or constant data give a figure with an
  explanatory note (in the figure and in the alt text), never a matplotlib exception; malformed
  arguments raise :class:`~residual_bandwidth.validation.BandwidthInputError`.

Figures are created with ``matplotlib.figure.Figure`` directly, not through ``pyplot``: Jupyter's
inline backend then does not show a second copy *without* alt text, and nothing accumulates in
pyplot's figure manager. Display an :class:`AccessibleFigure` as the last expression of a cell (its
``_repr_html_`` gives the image with its ``alt`` attribute, a caption and the data table), or save
it with :meth:`AccessibleFigure.save`.

Inputs: the foundation objects (:class:`~residual_bandwidth.analyzer.BandwidthReport`,
:class:`~residual_bandwidth.capture.ResidualCapture`) and, for the analytics and the monitor, tidy
records (lists of dicts) whose keys are listed in each function's docstring.
"""
from __future__ import annotations

import base64
import csv
import functools
import html
import io
import math
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from ..validation import BandwidthInputError

#: Font sizes and resolution of every figure, applied with ``matplotlib.rc_context`` while a figure
#: is made (:func:`styled`); importing this package leaves ``matplotlib.rcParams`` unchanged.
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9, "figure.dpi": 100}

#: Held while a figure is made or drawn. ``rc_context`` changes matplotlib's global settings, so two
#: threads making figures at once (the explorer renders layers in the background) would leave each
#: other's settings behind; with the lock they take turns.
FIGURE_LOCK = threading.RLock()


def styled(plot):
    """Run a figure function inside ``matplotlib.rc_context(STYLE)`` (holding :data:`FIGURE_LOCK`)."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with FIGURE_LOCK, matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)
    return wrapper

# Okabe & Ito (2008) palette: distinguishable under the common colour-vision deficiencies.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), "-", "--"]
HEATMAP_CMAP = "cividis"  # perceptually uniform and colour-vision-deficiency safe
MIN_FONT = 8


# =============================================================================================
# The container
# =============================================================================================
@dataclass
class AccessibleFigure:
    """A figure with its alt text and a table of the plotted data.

    ``notes`` lists what the figure could not show (empty input, a single layer, constant data);
    every note is also drawn in the figure and repeated in ``alt_text``.
    """
    figure: Figure
    alt_text: str
    table: list[dict] = field(default_factory=list)
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def save(self, path: str | Path, dpi: int = 120) -> Path:
        """Save the image (format from the suffix, e.g. ``.png``) and return the path."""
        path = Path(path)
        with FIGURE_LOCK:
            self.figure.savefig(path, dpi=dpi, bbox_inches="tight")
        return path

    def close(self) -> None:
        """Release the figure's memory (also removes it from pyplot if it was registered there)."""
        plt.close(self.figure)
        self.figure.clear()

    def columns(self) -> list[str]:
        """Column names of the table, in first-seen order over all rows."""
        cols: dict[str, None] = {}
        for row in self.table:
            cols.update(dict.fromkeys(row))
        return list(cols)

    def table_text(self, max_rows: int = 40) -> str:
        """The table as fixed-width text."""
        if not self.table:
            return "(no data)"
        cols = self.columns()
        rows = [[_cell(r.get(c, "")) for c in cols] for r in self.table[:max_rows]]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
        if len(self.table) > max_rows:
            lines.append(f"... {len(self.table) - max_rows} more rows")
        return "\n".join(lines)

    def table_markdown(self, max_rows: int = 40) -> str:
        """The table as a GitHub-flavoured markdown table (rendered as an HTML table)."""
        if not self.table:
            return "_(no data)_"
        cols = self.columns()
        esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(esc(_cell(r.get(c, ""))) for c in cols) + " |"
                  for r in self.table[:max_rows]]
        if len(self.table) > max_rows:
            lines.append(f"\n_{len(self.table) - max_rows} more rows in the CSV file._")
        return "\n".join(lines)

    def write_csv(self, path: str | Path) -> Path:
        """Write the whole table as CSV (lists are written as ``;``-separated values)."""
        path = Path(path)
        cols = self.columns()
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            for row in self.table:
                w.writerow({c: (";".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
                            for c, v in row.items()})
        return path

    def _table_html(self, max_rows: int = 60) -> str:
        if not self.table:
            return "<p>(no data)</p>"
        cols = self.columns()
        head = "".join(f'<th scope="col">{html.escape(c)}</th>' for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c, '')))}</td>" for c in cols)
                       + "</tr>" for r in self.table[:max_rows])
        more = (f"<p>{len(self.table) - max_rows} more rows (see <code>.table</code>)</p>"
                if len(self.table) > max_rows else "")
        return (f"<table><caption>Data for: {html.escape(self.title)}</caption>"
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}")

    def _repr_html_(self) -> str:
        buf = io.BytesIO()
        with FIGURE_LOCK:
            self.figure.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        img = base64.b64encode(buf.getvalue()).decode()
        # the image's alt text names the figure; the full description is the caption, read once
        alt = html.escape(f"Figure: {self.title or 'untitled'} (described in the caption)", quote=True)
        return (f'<figure><img src="data:image/png;base64,{img}" alt="{alt}"/>'
                f"<figcaption>{html.escape(self.alt_text)}</figcaption></figure>"
                f"<details><summary>Data table for: {html.escape(self.title)}</summary>"
                f"{self._table_html()}</details>")

    def __repr__(self) -> str:  # text/plain in a terminal: the alt text, not the object dump
        return f"AccessibleFigure({self.title!r})\n{self.alt_text}"


# =============================================================================================
# Small helpers: formatting, styles, notes, input checks
# =============================================================================================
def format_number(x) -> str:
    """How numbers are written in alt texts: whole numbers as ``22,700`` (also ``10.0 -> 10``);
    other floats with about 3 significant digits (``0.0312``, ``5.35``, ``14.7``, ``187``)."""
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x.is_integer() and abs(x) < 1e15:  # 10.0 -> "10", like an int
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if x == 0:
        return "0"
    return f"{x:.3g}"


def format_percent(x: float) -> str:
    """``0.684 -> '68.4%'``."""
    return f"{100 * float(x):.1f}%"


def format_ranges(values: Sequence[int]) -> str:
    """``[1, 2, 3, 5, 8, 9] -> '1-3, 5, 8-9'`` (layer lists in alt texts)."""
    vals = sorted({int(v) for v in values})
    if not vals:
        return "none"
    parts, start, prev = [], vals[0], vals[0]
    for v in vals[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def token_label(token: str) -> str:
    """A token made visible on an axis: newlines and tabs escaped, blank tokens quoted."""
    t = str(token).replace("\n", "\\n").replace("\t", "\\t")
    return t.strip() or repr(token)


def _cell(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "nan" if not math.isfinite(float(v)) else f"{float(v):.4g}"
    if isinstance(v, (list, tuple)):
        return ";".join(_cell(x) for x in v)
    return str(v)


def _style(i: int) -> dict:
    """Colour, marker and line style of the i-th category (all three differ)."""
    return dict(color=OKABE_ITO[i % len(OKABE_ITO)], marker=MARKERS[i % len(MARKERS)],
                linestyle=LINESTYLES[i % len(LINESTYLES)])


def _figure(figsize=(8, 4.5), nrows: int = 1, ncols: int = 1, **kw):
    """A Figure outside pyplot (see module docstring) and a 2-D array of axes."""
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _note(ax, text: str) -> None:
    """Draw an explanatory note in the middle of empty axes (a boxed text)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10, wrap=True,
            bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.3", alpha=0.95), zorder=10)


def _placeholder(title: str, note: str, xlabel: str = "", ylabel: str = "") -> AccessibleFigure:
    """The figure shown when there is nothing to draw: empty axes, the title and the reason."""
    fig, axes = _figure((7, 3.2))
    axes[0, 0].set(title=title, xlabel=xlabel, ylabel=ylabel, xticks=[], yticks=[])
    _note(axes[0, 0], note)
    return AccessibleFigure(fig, f"{title}: {note}", [], title, [note])


def _nothing(what: str) -> str:
    """The placeholder's note for an empty list of ``what``."""
    return f"No {what} were given, so there is nothing to draw."


def _finish(fig, alt: str, table: list[dict], title: str, notes: list[str]) -> AccessibleFigure:
    """Draw the notes under the plot, append them to the alt text and build the container."""
    if notes:
        width = max(40, int(fig.get_figwidth() / 0.075))  # about 0.075 inch per 9-pt character
        text = "\n".join(textwrap.fill("Note: " + n, width) for n in notes)
        fig.text(0.01, 0.0, text, ha="left", va="top", fontsize=9,
                 bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.3"))
        alt = alt.rstrip() + " Note: " + " ".join(notes)
    return AccessibleFigure(fig, alt, table, title, list(notes))


def _records(records, required: Sequence[str], name: str, ints: Sequence[str] = (),
             nums: Sequence[str] = (), choices: Mapping[str, Sequence] | None = None) -> list[dict]:
    """Validate tidy records: a list (or tuple) of mappings that all have the ``required`` keys.

    Returns copies in which the ``ints`` fields are ints and the ``nums`` fields floats (None -> NaN),
    and checks that each ``choices`` field holds one of its allowed values.
    """
    if records is None:
        return []
    if isinstance(records, Mapping) or not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
        raise BandwidthInputError(f"{name}: expected a list of dicts, got {type(records).__name__}")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise BandwidthInputError(f"{name}[{i}]: expected a dict, got {type(r).__name__}")
        missing = [k for k in required if k not in r]
        if missing:
            raise BandwidthInputError(f"{name}[{i}]: missing key(s) {missing}; each record needs "
                                      f"{list(required)}")
        r = dict(r)
        for k, allowed in (choices or {}).items():
            if r[k] not in allowed:
                raise BandwidthInputError(f"{name}[{i}]: {k} {r[k]!r} is not one of {list(allowed)}")
        r.update({k: _int(r[k], f"{name}[{i}].{k}") for k in ints})
        r.update({k: _num(r[k], f"{name}[{i}].{k}") for k in nums})
        out.append(r)
    return out


def _num(value, name: str, allow_nan: bool = True) -> float:
    """A real number from a record field (None becomes NaN when ``allow_nan``)."""
    if value is None and allow_nan:
        return float("nan")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BandwidthInputError(f"{name}: expected a number, got {value!r}")
    v = float(value)
    if not allow_nan and not math.isfinite(v):
        raise BandwidthInputError(f"{name}: expected a finite number, got {v}")
    return v


def _int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)) \
            or (isinstance(value, (float, np.floating)) and not float(value).is_integer()):
        raise BandwidthInputError(f"{name}: expected an integer, got {value!r}")
    return int(value)


def _positive_int(value, name: str) -> int:
    v = _int(value, name)
    if v < 1:
        raise BandwidthInputError(f"{name}: expected a positive integer, got {v}")
    return v


def _check_report(report) -> None:
    needed = ("layers", "all_positions", "without_massive", "d_model", "variance_threshold")
    if any(not hasattr(report, k) for k in needed):
        raise BandwidthInputError(f"report: expected a BandwidthReport (from analyze_layers), got "
                                  f"{type(report).__name__}")


def _report_layers(report) -> tuple[list[int], int]:
    """A checked report's layers and its variance threshold in percent."""
    _check_report(report)
    return report.layers, round(100 * report.variance_threshold)


def _which(report, which: str):
    if which not in ("without_massive", "all_positions"):
        raise BandwidthInputError(f"which: expected 'without_massive' or 'all_positions', got {which!r}")
    return getattr(report, which)


def _pick_layers(available: Sequence[int], layers, max_layers: int) -> list[int]:
    """The requested layers (checked), or up to ``max_layers`` evenly spaced ones incl. first/last."""
    available = list(available)
    if layers is not None:
        if isinstance(layers, (int, np.integer)):
            layers = [layers]
        chosen = [_int(L, "layers") for L in layers]
        bad = [L for L in chosen if L not in available]
        if bad:
            raise BandwidthInputError(f"layers: {bad} not in the report (have {format_ranges(available)})")
        return chosen
    if len(available) <= max_layers:
        return available
    idx = np.unique(np.linspace(0, len(available) - 1, max_layers).round().astype(int))
    return [available[i] for i in idx]


def _thin_ticks(ax, axis: str, labels: Sequence[str], max_labels: int = 40, rotate: bool = False):
    """One tick per cell, labelling every k-th cell when there are more than ``max_labels``."""
    n = len(labels)
    step = max(1, math.ceil(n / max_labels))
    ticks = list(range(0, n, step))
    size = max(MIN_FONT, 10 - n // 20)
    if axis == "x":
        ax.set_xticks(ticks)
        ax.set_xticklabels([labels[i] for i in ticks], rotation=90 if rotate else 0, fontsize=size)
    else:
        ax.set_yticks(ticks)
        ax.set_yticklabels([labels[i] for i in ticks], fontsize=size)


def _color_norm(values: np.ndarray, log: bool, notes: list[str], what: str):
    """A colour normalisation for a heatmap that never fails: constant or empty data get a note."""
    finite = values[np.isfinite(values)]
    if log:
        finite = finite[finite > 0]
    if finite.size == 0:
        notes.append(f"No finite {what} values to colour.")
        return mcolors.Normalize(0, 1)
    lo, hi = float(finite.min()), float(finite.max())
    if lo == hi:
        notes.append(f"Every cell has the same {what} ({format_number(lo)}); the colour carries no "
                     "information.")
        return (mcolors.LogNorm(lo / 2, hi * 2) if log else mcolors.Normalize(lo - 0.5, hi + 0.5))
    return mcolors.LogNorm(lo, hi) if log else mcolors.Normalize(lo, hi)


def _glyph(ax, xs, ys, marker: str, size: float = 60, label: str | None = None, light: bool = False):
    """Category glyphs drawn over a heatmap: black with a white edge (visible on dark and light)."""
    if len(xs) == 0:
        return
    face, edge = ("white", "black") if light else ("black", "white")
    ax.scatter(xs, ys, marker=marker, s=size, facecolors=face, edgecolors=edge, linewidths=1.0,
               label=label, zorder=4)


def _sorted_values(values) -> list:
    """Sort numbers numerically and anything else (or a mix) by its text."""
    values = list(values)
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
        return sorted(values)
    return sorted(values, key=str)


def _glyph_size(n_rows: int, n_cols: int) -> float:
    return float(np.clip(2600 / max(n_rows, n_cols, 1), 12, 90))


def _layer_lines(layers, series: Mapping[str, Sequence[float]], title: str, xlabel: str, ylabel: str):
    """One line per series over the layers, each with its own colour, marker and dash."""
    fig, axes = _figure((8, 4.5))
    ax = axes[0, 0]
    for i, (label, ys) in enumerate(series.items()):
        ax.plot(layers, ys, label=label, markersize=5, **_style(i))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _one_layer_note(layers) -> list[str]:
    return ["Only one layer was analysed, so there is no trend with depth."] if len(layers) == 1 else []


