"""Figures that are accessible by construction.

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
import html
import io
import math
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from .validation import BandwidthInputError

# Okabe & Ito (2008) palette: distinguishable under the common colour-vision deficiencies.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), "-", "--"]
HEATMAP_CMAP = "cividis"  # perceptually uniform and colour-vision-deficiency safe
MIN_FONT = 8
plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
                     "legend.fontsize": 9, "figure.dpi": 100})

#: How a bottleneck severity is drawn on the heatmap: (marker, legend text). "none" has no glyph.
SEVERITY_GLYPHS = {
    "warning": ("^", "warning (triangle)"),
    "critical": ("X", "critical (cross)"),
    "massive": ("*", "massive activation (star, hatched, left out of the colour scale)"),
}
SEVERITIES = ("none", "warning", "critical", "massive")


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
    ax = axes[0, 0]
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks([])
    ax.set_yticks([])
    _note(ax, note)
    return AccessibleFigure(fig, f"{title}: {note}", [], title, [note])


def _finish(fig, alt: str, table: list[dict], title: str, notes: list[str]) -> AccessibleFigure:
    """Draw the notes under the plot, append them to the alt text and build the container."""
    if notes:
        width = max(40, int(fig.get_figwidth() / 0.075))  # about 0.075 inch per 9-pt character
        text = "\n".join(textwrap.fill("Note: " + n, width) for n in notes)
        fig.text(0.01, 0.0, text, ha="left", va="top", fontsize=9,
                 bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.3"))
        alt = alt.rstrip() + " Note: " + " ".join(notes)
    return AccessibleFigure(fig, alt, table, title, list(notes))


def _records(records, required: Sequence[str], name: str) -> list[dict]:
    """Validate tidy records: a list (or tuple) of mappings that all have the ``required`` keys."""
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
        out.append(dict(r))
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


# =============================================================================================
# LO1: spectra and ranks (foundation data)
# =============================================================================================
def plot_singular_spectra(report, layers=None, which: str = "without_massive",
                          max_layers: int = 5) -> AccessibleFigure:
    """Singular values of the (centred) residual at a few layers, log scale, with rank markers.

    For each chosen layer: ``sigma_i = sqrt(lambda_i)`` against the component index ``i``, and on
    the curve the four members of the effective-rank family at their (interpolated) index:
    ``r_p`` (the variance-threshold rank), the participation ratio, the stable rank and the
    entropy effective rank. ``which`` picks the spectra with ("all_positions") or without
    ("without_massive", default) the massive-activation positions. Exact zeros (beyond the sample's
    rank) cannot be drawn on a log axis and are left out; the alt text says how many.

    Table: one row per (layer, component) with ``singular_value``, ``variance_share`` and
    ``cumulative_share``.
    """
    _check_report(report)
    metrics = _which(report, which)
    max_layers = _positive_int(max_layers, "max_layers")
    p = round(100 * report.variance_threshold)
    title = f"Singular-value spectra of the residual stream ({which.replace('_', ' ')})"
    if not report.layers:
        return _placeholder(title, "The report has no layers.", "component index", "singular value")
    chosen = _pick_layers(report.layers, layers, max_layers)
    by_layer = dict(zip(report.layers, metrics))
    fig, axes = _figure((8.5, 5))
    ax = axes[0, 0]
    notes, table, sentences = [], [], []
    rank_marks = [("variance_rank", f"r{p} ({p}% variance rank)", "|"),
                  ("participation_ratio", "participation ratio", "o"),
                  ("stable_rank", "stable rank", "s"),
                  ("entropy_rank", "entropy effective rank", "^")]
    n_zero_total = 0
    for i, L in enumerate(chosen):
        m = by_layer[L]
        lam = np.asarray(m.eigenvalues, dtype=float)
        sig = np.sqrt(np.clip(lam, 0, None))
        share = lam / lam.sum()
        cum = np.cumsum(share)
        for k, (s, sh, c) in enumerate(zip(sig, share, cum), start=1):
            table.append({"layer": L, "component": k, "singular_value": float(s),
                          "variance_share": float(sh), "cumulative_share": float(c)})
        pos = sig > 0
        n_zero_total += int((~pos).sum())
        idx = np.arange(1, sig.size + 1)
        st = _style(i)
        ax.plot(idx[pos], sig[pos], color=st["color"], linestyle=st["linestyle"], linewidth=1.8,
                label=f"layer {L}")
        for attr, _, marker in rank_marks:
            r = float(getattr(m, attr))
            y = float(np.interp(r, idx[pos], sig[pos])) if pos.sum() > 1 else float(sig[0])
            ax.scatter([r], [y], marker=marker, s=70 if marker != "|" else 160, color=st["color"],
                       edgecolors="black" if marker != "|" else None, linewidths=1.0, zorder=3)
        nz = sig[pos]
        sentences.append(
            f"Layer {L}: sigma falls from {format_number(nz[0])} to {format_number(nz[-1])} over "
            f"{int(pos.sum())} non-zero components; r{p} = {m.variance_rank}, participation ratio "
            f"{format_number(m.participation_ratio)}, stable rank {format_number(m.stable_rank)}, "
            f"entropy rank {format_number(m.entropy_rank)}.")
    ax.set_yscale("log")
    ax.set_xlabel("principal component index i (1 = largest variance)")
    ax.set_ylabel("singular value sigma_i of the centred residual\n(residual units, log scale)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    layer_legend = ax.legend(title="layer (colour + line style)", loc="upper right")
    ax.add_artist(layer_legend)
    proxies = [Line2D([], [], color="black", marker=mk, linestyle="none", markersize=8 if mk != "|" else 12,
                      markerfacecolor="white" if mk != "|" else "black", label=lab)
               for _, lab, mk in rank_marks]
    ax.legend(handles=proxies, title="rank markers (on each curve)", loc="lower left")
    if len(report.layers) == 1:
        notes.append("Only one layer was analysed, so there is no change with depth to show.")
    if n_zero_total:
        notes.append(f"{n_zero_total} exactly-zero singular value(s) beyond the sample's rank are not "
                     "drawn on the log axis.")
    n_rows = metrics[0].n_positions
    alt = (f"Log-scale singular-value spectra at {len(chosen)} of {len(report.layers)} layers "
           f"({', '.join(map(str, chosen))}), {n_rows} positions "
           f"({'without' if which == 'without_massive' else 'including'} massive activations), "
           f"d_model {report.d_model}. " + " ".join(sentences))
    return _finish(fig, alt, table, title, notes)


def plot_cumulative_variance(report, layers=None, max_layers: int = 4) -> AccessibleFigure:
    """Cumulative explained variance ``sum_{i<=k} lambda_i / sum lambda`` against ``k``, with the
    ``p`` line (95 % by default) and where each curve crosses it (= ``r_p``).

    Each chosen layer is drawn twice in the same colour and marker: solid without the
    massive-activation positions, dotted with all positions, so the collapse a single massive vector
    causes is visible (with it, one direction can hold almost all the variance).
    Table: one row per (layer, positions, k).
    """
    _check_report(report)
    max_layers = _positive_int(max_layers, "max_layers")
    p = report.variance_threshold
    pp = round(100 * p)
    title = f"Cumulative explained variance and the {pp}% line"
    if not report.layers:
        return _placeholder(title, "The report has no layers.", "k", "explained variance")
    chosen = _pick_layers(report.layers, layers, max_layers)
    fig, axes = _figure((8.5, 5))
    ax = axes[0, 0]
    table, sentences, notes = [], [], []
    variants = [("without_massive", "without massive positions", "-"),
                ("all_positions", "all positions", ":")]
    for i, L in enumerate(chosen):
        j = report.layers.index(L)
        st = _style(i)
        ranks = {}
        for which, label, ls in variants:
            m = getattr(report, which)[j]
            lam = np.asarray(m.eigenvalues, dtype=float)
            cum = np.cumsum(lam) / lam.sum()
            k = np.arange(1, cum.size + 1)
            ax.plot(k, cum, color=st["color"], linestyle=ls, marker=st["marker"],
                    markevery=max(1, cum.size // 8), markersize=5, linewidth=1.8 if ls == "-" else 1.4)
            r = m.variance_rank
            ax.plot([r], [cum[r - 1]], marker="|", markersize=16, color="black", zorder=4)
            ranks[which] = (r, float(lam[0] / lam.sum()), m.n_positions)
            table += [{"layer": L, "positions": which, "k": int(kk), "cumulative_share": float(c)}
                      for kk, c in zip(k, cum)]
        (rc, _, nc), (ra, top_a, na) = ranks["without_massive"], ranks["all_positions"]
        same = nc == na
        sentences.append(
            f"Layer {L}: {pp}% of the variance needs {rc} components"
            + (" (no massive position was excluded)." if same else
               f" without the {na - nc} massive position(s) but {ra} with them, where the first "
               f"component alone holds {format_percent(top_a)}."))
    ax.axhline(p, color="black", linestyle="--", linewidth=1.2)
    ax.text(1.0, p, f" {pp}% ", transform=ax.get_yaxis_transform(), va="bottom", ha="right", fontsize=9)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("number of principal components k (log scale)")
    ax.set_ylabel("share of total variance held by the top k")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=_style(i)["color"], marker=_style(i)["marker"], label=f"layer {L}")
               for i, L in enumerate(chosen)]
    handles += [Line2D([], [], color="0.3", linestyle=ls, label=lab) for _, lab, ls in variants]
    handles += [Line2D([], [], color="black", marker="|", markersize=12, linestyle="none",
                       label=f"r{pp}: first k at or above the line")]
    ax.legend(handles=handles, loc="lower right")
    if len(report.layers) == 1:
        notes.append("Only one layer was analysed.")
    alt = (f"Cumulative share of variance against the number of principal components k, at layers "
           f"{', '.join(map(str, chosen))} (d_model {report.d_model}), with a dashed line at {pp}%. "
           + " ".join(sentences))
    return _finish(fig, alt, table, title, notes)


def plot_rank_by_layer(report) -> AccessibleFigure:
    """Effective-rank family by layer (positions with massive activations left out), plus r_p with them."""
    _check_report(report)
    layers = report.layers
    p = round(100 * report.variance_threshold)
    title = f"How many of {report.d_model} residual dimensions are used, by layer"
    if not layers:
        return _placeholder(title, "The report has no layers.", "layer", "dimensions")
    series = {
        f"r{p} (variance rank), all positions": [m.variance_rank for m in report.all_positions],
        f"r{p}, without massive positions": [m.variance_rank for m in report.without_massive],
        "entropy effective rank": [m.entropy_rank for m in report.without_massive],
        "participation ratio": [m.participation_ratio for m in report.without_massive],
        "stable rank": [m.stable_rank for m in report.without_massive],
    }
    fig, axes = _figure((8, 4.5))
    ax = axes[0, 0]
    for i, (label, ys) in enumerate(series.items()):
        ax.plot(layers, ys, label=label, markersize=5, **_style(i))
    ax.set_yscale("log")
    ax.set_xlabel("layer (block index, resid_post)")
    ax.set_ylabel("dimensions (log scale)")
    ax.set_title(title)
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    notes = ["Only one layer was analysed, so there is no trend with depth."] if len(layers) == 1 else []
    clean = series[f"r{p}, without massive positions"]
    allp = series[f"r{p} (variance rank), all positions"]
    lo, hi = int(np.argmin(clean)), int(np.argmax(clean))
    alt = (f"Line chart over {len(layers)} layers. Without massive-activation positions, the "
           f"{p}%-variance rank ranges from {clean[lo]} (layer {layers[lo]}) to {clean[hi]} "
           f"(layer {layers[hi]}) of {report.d_model} dimensions; with them it ranges from "
           f"{min(allp)} to {max(allp)}. Participation ratio ranges "
           f"{min(series['participation ratio']):.1f}-{max(series['participation ratio']):.1f}, "
           f"stable rank {min(series['stable rank']):.2f}-{max(series['stable rank']):.2f}.")
    table = [{"layer": layers[i], **{k: (float(v[i]) if isinstance(v[i], float) else v[i])
                                     for k, v in series.items()}} for i in range(len(layers))]
    return _finish(fig, alt, table, title, notes)


def plot_utilization_by_layer(report) -> AccessibleFigure:
    """Utilization by layer against both denominators, with and without massive positions.

    ``r_p / min(n, d)`` is the share of the directions this *sample* can span (n positions); ``r_p / d``
    is the share of the residual width. With fewer positions than dimensions only the first can be
    large; reporting both keeps the seed's checkpoint-3 confusion (15 / 48) from happening again.
    """
    _check_report(report)
    layers = report.layers
    p = round(100 * report.variance_threshold)
    title = f"Utilization of the residual stream by layer (r{p} as a share)"
    if not layers:
        return _placeholder(title, "The report has no layers.", "layer", "utilization (%)")
    series = {
        f"r{p} / min(n, d), without massive": [100 * m.utilization_available for m in report.without_massive],
        f"r{p} / min(n, d), all positions": [100 * m.utilization_available for m in report.all_positions],
        f"r{p} / d_model, without massive": [100 * m.utilization_d_model for m in report.without_massive],
        f"r{p} / d_model, all positions": [100 * m.utilization_d_model for m in report.all_positions],
    }
    fig, axes = _figure((8, 4.5))
    ax = axes[0, 0]
    for i, (label, ys) in enumerate(series.items()):
        ax.plot(layers, ys, label=label, markersize=5, **_style(i))
    ax.set_ylim(0, 105)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel("utilization (% of the denominator)")
    ax.set_title(title)
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    notes = ["Only one layer was analysed, so there is no trend with depth."] if len(layers) == 1 else []
    c_av = [m.utilization_available for m in report.without_massive]
    c_d = [m.utilization_d_model for m in report.without_massive]
    a_av = [m.utilization_available for m in report.all_positions]
    n_c = report.without_massive[0].n_positions
    alt = (f"Utilization over {len(layers)} layers. Without massive positions (n = {n_c}), r{p} uses "
           f"{format_percent(min(c_av))}-{format_percent(max(c_av))} of the min(n, d) = "
           f"{min(n_c, report.d_model)} directions the sample can span, but only "
           f"{format_percent(min(c_d))}-{format_percent(max(c_d))} of d_model = {report.d_model}. "
           f"With all {report.all_positions[0].n_positions} positions r{p} / min(n, d) ranges "
           f"{format_percent(min(a_av))}-{format_percent(max(a_av))}.")
    table = [{"layer": L, "n_without_massive": report.without_massive[i].n_positions,
              "n_all": report.all_positions[i].n_positions,
              "util_available_without_massive": c_av[i], "util_available_all": a_av[i],
              "util_d_model_without_massive": c_d[i],
              "util_d_model_all": report.all_positions[i].utilization_d_model}
             for i, L in enumerate(layers)]
    return _finish(fig, alt, table, title, notes)


def plot_massive_norms(report, capture) -> AccessibleFigure:
    """Median residual norm and the largest norm per layer (log scale); massive layers marked."""
    _check_report(report)
    layers = report.layers
    title = "Residual norm by layer: typical vs loudest position"
    if not layers:
        return _placeholder(title, "The report has no layers.", "layer", "norm")
    med, top, who = [], [], []
    for layer in layers:
        norms = capture.get(report.kind, layer).double().norm(dim=1)
        i = int(norms.argmax())
        med.append(float(norms.median()))
        top.append(float(norms[i]))
        who.append(capture.row_label(i))
    fig, axes = _figure((8, 4.5))
    ax = axes[0, 0]
    ax.plot(layers, med, label="median position", **_style(0))
    ax.plot(layers, top, label="loudest position", **_style(3))
    flagged = sorted({m.layer for m in report.massive})
    if flagged:
        ax.scatter(flagged, [top[layers.index(L)] for L in flagged], s=110, facecolors="none",
                   edgecolors="black", linewidths=1.5, label="massive activation (ring)", zorder=3)
    notes = []
    if min(med) <= 0:
        notes.append("Some layer has a zero median norm, which a log axis cannot show.")
    else:
        ax.set_yscale("log")
    ax.set_xlabel("layer (block index, resid_post)")
    ax.set_ylabel("residual norm ||x|| (residual units, log scale)")
    ax.set_title(title)
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    ratio = np.array(top) / np.where(np.array(med) > 0, np.array(med), np.nan)
    k = int(np.nanargmax(ratio)) if np.isfinite(ratio).any() else 0
    alt = (f"Two lines over {len(layers)} layers, log scale. The median position's norm grows from "
           f"{format_number(med[0])} to {format_number(med[-1])}. The loudest position peaks at "
           f"{format_number(top[k])} at layer {layers[k]}, {format_number(float(ratio[k]))} times the "
           f"median ({who[k]}). "
           f"{len(flagged)} layer(s) have a massive activation (ringed).")
    table = [{"layer": L, "median_norm": med[i], "max_norm": top[i], "max_over_median": float(ratio[i]),
              "loudest": who[i], "massive": L in flagged} for i, L in enumerate(layers)]
    return _finish(fig, alt, table, title, notes)


def plot_norm_heatmap(capture, report=None, prompt: int = 0, kind: str | None = None,
                      massive_ratio: float = 4.0, max_positions: int = 64) -> AccessibleFigure:
    """Residual norm ``||x||`` by layer (rows) and position (columns, tokens as labels) for one prompt.

    Colour is the norm on a log scale (cividis). A star marks a massive activation: a norm at least
    ``massive_ratio`` times the layer's median norm over *all* captured positions (the analyzer's
    definition; when ``report`` is given its ``massive`` list is used as is, so the figure and the
    report agree).
    Table: one row per (layer, position): norm, ratio to the layer median, massive flag.
    """
    from .capture import ResidualCapture
    if not isinstance(capture, ResidualCapture):
        raise BandwidthInputError(f"capture: expected a ResidualCapture, got {type(capture).__name__}")
    if report is not None:
        _check_report(report)
    kind = kind or (report.kind if report is not None else "resid_post")
    prompt = _int(prompt, "prompt")
    max_positions = _positive_int(max_positions, "max_positions")
    from .validation import check_positive
    massive_ratio = check_positive(massive_ratio, "massive_ratio")
    prompts = sorted(set(capture.prompt_index.tolist()))
    if prompt not in prompts:
        raise BandwidthInputError(f"prompt: {prompt} not captured (have prompts {format_ranges(prompts)})")
    rows = [i for i in range(capture.n_rows) if int(capture.prompt_index[i]) == prompt]
    notes = []
    if len(rows) > max_positions:
        notes.append(f"Only the first {max_positions} of {len(rows)} positions are shown.")
        rows = rows[:max_positions]
    layers = capture.layers
    norms = np.array([capture.get(kind, L).double().norm(dim=1).numpy() for L in layers])  # [L, N]
    median = np.median(norms, axis=1)
    grid = norms[:, rows]
    ratio = grid / np.where(median > 0, median, np.nan)[:, None]
    if report is not None and report.kind == kind:
        flagged = {(m.layer, m.row) for m in report.massive}
        mass = np.array([[(L, r) in flagged for r in rows] for L in layers])
    else:
        mass = np.nan_to_num(ratio, nan=np.inf) >= massive_ratio
    tokens = [capture.tokens[r] for r in rows]
    positions = [int(capture.position[r]) for r in rows]
    title = f"Residual norm by layer and position ({kind}, prompt {prompt})"
    fig, axes = _figure((max(6.5, 1.2 + 0.32 * len(rows)), max(4.0, 1.6 + 0.2 * len(layers))))
    ax = axes[0, 0]
    norm = _color_norm(grid, log=True, notes=notes, what="norm")
    im = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", origin="lower", cmap=HEATMAP_CMAP,
                   norm=norm, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="residual norm ||x|| (log colour scale)")
    ys, xs = np.nonzero(mass)
    _glyph(ax, xs, ys, "*", _glyph_size(len(layers), len(rows)),
           label=f"massive activation (norm >= {format_number(massive_ratio)}x layer median)")
    _thin_ticks(ax, "x", [f"{q} {token_label(t)}" for q, t in zip(positions, tokens)], rotate=True)
    _thin_ticks(ax, "y", [str(L) for L in layers])
    ax.set_xlabel("position and token")
    ax.set_ylabel("layer (block index)")
    ax.set_title(title)
    if len(xs):
        fig.legend(loc="outside lower center", fontsize=8, frameon=False)
    if len(layers) == 1:
        notes.append("Only one layer was captured.")
    if len(rows) == 1:
        notes.append("The prompt has a single position.")
    med_pos = np.median(grid, axis=1)
    li, pi = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
    massive_cols = sorted(set(xs.tolist()))
    mass_txt = "; ".join(
        f"position {positions[c]} {tokens[c]!r} is massive at layers {format_ranges([layers[y] for y in ys[xs == c]])}"
        for c in massive_cols[:4]) or "no position is massive"
    alt = (f"Heatmap of residual norms for prompt {prompt} ({len(rows)} positions x {len(layers)} layers, "
           f"log colour scale). The median norm over this prompt's positions goes from "
           f"{format_number(float(med_pos[0]))} at layer {layers[0]} to {format_number(float(med_pos[-1]))} "
           f"at layer {layers[-1]}. The largest norm is {format_number(float(grid[li, pi]))} at layer "
           f"{layers[li]}, position {positions[pi]} {tokens[pi]!r}, "
           f"{format_number(float(ratio[li, pi]))} times that layer's median over all "
           f"{capture.n_rows} captured positions. {mass_txt[:1].upper() + mass_txt[1:]} (stars).")
    table = [{"layer": L, "position": positions[c], "token": tokens[c], "norm": float(grid[r, c]),
              "ratio_to_layer_median": float(ratio[r, c]), "massive": bool(mass[r, c])}
             for r, L in enumerate(layers) for c in range(len(rows))]
    return _finish(fig, alt, table, title, notes)


# =============================================================================================
# LO2: bottlenecks and the monitor (records from the analytics and monitor modules)
# =============================================================================================
BOTTLENECK_KEYS = ("layer", "prompt", "position", "token", "norm_ratio", "spread", "score",
                   "severity", "massive")


def plot_bottleneck_heatmap(records, prompt: int | None = None, value: str = "score",
                            max_positions: int = 64) -> AccessibleFigure:
    """Bottleneck ``value`` (default ``score``) by layer and position for one prompt.

    ``records``: dicts with ``layer, prompt, position, token, norm_ratio, spread, score, severity,
    massive``; ``severity`` is "none", "warning", "critical" or "massive". Severities are glyphs
    (triangle, cross, star; see :data:`SEVERITY_GLYPHS`), not colours. Massive-activation cells are
    hatched and left out of the colour scale: they are a different phenomenon (one loud direction)
    and would otherwise squash every other cell into one colour. ``prompt=None`` shows the first
    prompt in the records.
    Table: the records of the shown prompt, sorted by layer and position.
    """
    if value not in ("score", "norm_ratio", "spread"):
        raise BandwidthInputError(f"value: expected 'score', 'norm_ratio' or 'spread', got {value!r}")
    recs = _records(records, BOTTLENECK_KEYS, "bottleneck records")
    max_positions = _positive_int(max_positions, "max_positions")
    title = f"Bottleneck {value.replace('_', ' ')} by layer and position"
    if not recs:
        return _placeholder(title, "No bottleneck records were given, so there is nothing to draw.",
                            "position", "layer")
    for i, r in enumerate(recs):
        if r["severity"] not in SEVERITIES:
            raise BandwidthInputError(f"bottleneck records[{i}]: severity {r['severity']!r} is not one "
                                      f"of {SEVERITIES}")
        r["layer"], r["prompt"], r["position"] = (_int(r[k], f"bottleneck records[{i}].{k}")
                                                  for k in ("layer", "prompt", "position"))
        for k in ("norm_ratio", "spread", "score"):
            r[k] = _num(r[k], f"bottleneck records[{i}].{k}")
        r["massive"] = bool(r["massive"]) or r["severity"] == "massive"
    prompts = sorted({r["prompt"] for r in recs})
    if prompt is None:
        prompt = prompts[0]
    prompt = _int(prompt, "prompt")
    if prompt not in prompts:
        raise BandwidthInputError(f"prompt: {prompt} has no records (prompts present: {format_ranges(prompts)})")
    rows = sorted((r for r in recs if r["prompt"] == prompt), key=lambda r: (r["layer"], r["position"]))
    layers = sorted({r["layer"] for r in rows})
    positions = sorted({r["position"] for r in rows})
    notes = []
    if len(positions) > max_positions:
        notes.append(f"Only the first {max_positions} of {len(positions)} positions are shown.")
        positions = positions[:max_positions]
        rows = [r for r in rows if r["position"] in set(positions)]
    tok = {}
    for r in rows:
        tok.setdefault(r["position"], str(r["token"]))
    li, pi = {L: i for i, L in enumerate(layers)}, {q: j for j, q in enumerate(positions)}
    grid = np.full((len(layers), len(positions)), np.nan)
    sev = np.full(grid.shape, "", dtype=object)
    for r in rows:
        a, b = li[r["layer"]], pi[r["position"]]
        grid[a, b] = r[value]
        sev[a, b] = "massive" if r["massive"] else r["severity"]
    colour = np.where(sev == "massive", np.nan, grid)
    fig, axes = _figure((max(6.5, 1.6 + 0.34 * len(positions)), max(4.0, 1.8 + 0.2 * len(layers))))
    ax = axes[0, 0]
    ax.set_facecolor("0.85")
    cnorm = _color_norm(colour, log=False, notes=notes, what=value)
    im = ax.imshow(colour, aspect="auto", origin="lower", cmap=HEATMAP_CMAP, norm=cnorm,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label=f"{value.replace('_', ' ')} (unitless; massive cells excluded)")
    for a, b in zip(*np.nonzero(sev == "massive")):
        ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.25",
                               linewidth=0))
    size = _glyph_size(len(layers), len(positions))
    for s, (marker, label) in SEVERITY_GLYPHS.items():
        ys, xs = np.nonzero(sev == s)
        _glyph(ax, xs, ys, marker, size * (1.4 if s == "massive" else 1.0), label=label,
               light=(s == "massive"))
    _thin_ticks(ax, "x", [f"{q} {token_label(tok[q])}" for q in positions], rotate=True)
    _thin_ticks(ax, "y", [str(L) for L in layers])
    ax.set_xlabel("position and token")
    ax.set_ylabel("layer (block index)")
    ax.set_title(title + f" (prompt {prompt})")
    handles = [Line2D([], [], marker=m, linestyle="none", markersize=9, markerfacecolor="black",
                      markeredgecolor="white", label=lab) for s, (m, lab) in SEVERITY_GLYPHS.items()
               if s != "massive"]
    handles.append(Patch(facecolor="0.85", hatch="///", edgecolor="0.25",
                         label=SEVERITY_GLYPHS["massive"][1]))
    handles.append(Patch(facecolor="white", edgecolor="0.5", label="no glyph: severity none"))
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    if len(layers) == 1:
        notes.append("Only one layer has records.")
    if len(positions) == 1:
        notes.append("The prompt has records for a single position.")
    counts = Counter(sev[sev != ""].tolist())
    count_txt = ", ".join(f"{counts.get(s, 0)} {s}" for s in SEVERITIES)
    shown = [r for r in rows if not r["massive"] and math.isfinite(r[value])]
    if shown:
        top = max(shown, key=lambda r: r[value])
        top_txt = (f"The highest non-massive {value} is {format_number(top[value])} at layer {top['layer']}, "
                   f"position {top['position']} {top['token']!r} (severity {top['severity']}, norm ratio "
                   f"{format_number(top['norm_ratio'])}, spread {format_number(top['spread'])}).")
    else:
        top_txt = f"No non-massive cell has a finite {value}."
    crit = [r for r in rows if r["severity"] == "critical" and not r["massive"]]
    crit_txt = ("Critical cells: " + "; ".join(f"layer {r['layer']} position {r['position']} {r['token']!r}"
                                               for r in crit[:5]) + ("; ..." if len(crit) > 5 else "") + "."
                if crit else "")
    mass_pos = sorted({r["position"] for r in rows if r["massive"]})
    mass_txt = "; ".join(f"position {q} {tok[q]!r} is a massive activation at layers "
                         f"{format_ranges([r['layer'] for r in rows if r['massive'] and r['position'] == q])}"
                         for q in mass_pos[:4])
    alt = (f"Heatmap of bottleneck {value} for prompt {prompt}"
           + (f" (1 of {len(prompts)} prompts)" if len(prompts) > 1 else "")
           + f": {len(positions)} positions x {len(layers)} layers. Cells by severity: {count_txt}. "
           + top_txt + (" " + crit_txt if crit_txt else "")
           + (" " + mass_txt[:1].upper() + mass_txt[1:] + " (hatched, starred, excluded from the colour scale)."
              if mass_txt else ""))
    table = [{k: r[k] for k in BOTTLENECK_KEYS} for r in rows]
    return _finish(fig, alt, table, title, notes)


MONITOR_KEYS = ("request", "timestamp", "layer", "metric", "value")
ALERT_KEYS = ("request", "timestamp", "layer", "metric", "level", "value", "threshold")
#: How an alert is drawn on the timeline: (marker, face colour, legend text).
ALERT_GLYPHS = {
    "warning": ("^", "white", "warning alert (open triangle)"),
    "critical": ("X", "black", "critical alert (filled cross)"),
    "resolved": ("o", "none", "alert resolved (open circle)"),
}


def _layer_name(layer) -> str:
    return "request-level" if layer is None else f"layer {layer}"


def plot_monitor_timeline(records, alerts=None, thresholds=None, metrics=None,
                          directions: Mapping | None = None, max_metrics: int = 4) -> AccessibleFigure:
    """Per-request monitor metrics over time with warning and critical thresholds and alerts.

    ``records``: ``{request, timestamp, layer, metric, value}`` (``layer`` None for request-level
    metrics such as ``bad_input``); ``alerts``: ``{request, timestamp, layer, metric, level, value,
    threshold}`` with level "warning", "critical" or "resolved"; ``thresholds``:
    ``{metric: {"warning": w, "critical": c}}`` (either may be None). One panel per metric
    (x = request number), one line per layer (colour + marker + line style). The warning threshold
    is a dashed line and the critical one a dash-dotted line, each labelled with its value in the
    panel; alerts are glyphs (:data:`ALERT_GLYPHS`). ``directions`` ``{metric: "above"|"below"}``
    says whether large or small values are bad (the monitor's ``threshold_directions``); by
    default "below" when ``critical < warning``, else "above" (the monitor's own rule).
    Table: the records, each with the alert level raised at that point ("" if none).
    """
    recs = _records(records, MONITOR_KEYS, "monitor records")
    alts = _records(alerts, ALERT_KEYS, "alerts")
    thresholds = {} if thresholds is None else thresholds
    if not isinstance(thresholds, Mapping) or any(not isinstance(v, Mapping) for v in thresholds.values()):
        raise BandwidthInputError("thresholds: expected {metric: {'warning': w, 'critical': c}}")
    directions = {} if directions is None else dict(directions)
    bad_dir = {m: d for m, d in directions.items() if d not in ("above", "below")}
    if bad_dir:
        raise BandwidthInputError(f"directions: expected 'above' or 'below', got {bad_dir}")
    max_metrics = _positive_int(max_metrics, "max_metrics")
    title = "Bandwidth monitor timeline"
    if not recs:
        return _placeholder(title, "No monitor records were given, so there is nothing to draw.",
                            "request", "value")
    for i, r in enumerate(recs):
        r["request"] = _int(r["request"], f"monitor records[{i}].request")
        r["value"] = _num(r["value"], f"monitor records[{i}].value")
        r["metric"] = str(r["metric"])
    for i, a in enumerate(alts):
        if a["level"] not in ALERT_GLYPHS:
            raise BandwidthInputError(f"alerts[{i}]: level {a['level']!r} is not one of {list(ALERT_GLYPHS)}")
        a["request"] = _int(a["request"], f"alerts[{i}].request")
        a["value"] = _num(a["value"], f"alerts[{i}].value")
        a["metric"] = str(a["metric"])
    present = list(dict.fromkeys(r["metric"] for r in recs))
    if metrics is None:  # metrics with thresholds first: those are the ones that alert
        chosen = ([m for m in present if m in thresholds] + [m for m in present if m not in thresholds])
        chosen = chosen[:max_metrics]
    else:
        chosen = [metrics] if isinstance(metrics, str) else list(metrics)
        bad = [m for m in chosen if m not in present]
        if bad:
            raise BandwidthInputError(f"metrics: {bad} not in the records (have {present})")
    notes = []
    if len(present) > len(chosen) and metrics is None:
        notes.append(f"Showing {len(chosen)} of {len(present)} metrics "
                     f"({', '.join(m for m in present if m not in chosen)} left out; pass metrics=[...]).")
    fig, axes = _figure((9, 2.6 + 2.4 * len(chosen)), nrows=len(chosen), sharex=True)
    layers = _sorted_values({r["layer"] for r in recs})
    sentences, table = [], []
    alert_at = {(a["request"], str(a["layer"]), a["metric"]): a["level"] for a in alts}
    for ax, metric in zip(axes[:, 0], chosen):
        mrecs = [r for r in recs if r["metric"] == metric]
        for i, L in enumerate(layers):
            pts = sorted((r["request"], r["value"]) for r in mrecs if r["layer"] == L)
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, markersize=4, linewidth=1.3, markevery=max(1, len(x) // 20), **_style(i))
        th = thresholds.get(metric, {})
        w, c = th.get("warning"), th.get("critical")
        for level, val, ls, lw in (("warning", w, "--", 1.3), ("critical", c, "-.", 1.8)):
            if val is not None:
                ax.axhline(val, color="black", linestyle=ls, linewidth=lw)
                ax.text(0.995, val, f"{level} {format_number(val)}", transform=ax.get_yaxis_transform(),
                        ha="right", va="bottom", fontsize=9,
                        bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
        for level, (marker, face, _) in ALERT_GLYPHS.items():
            pts = [(a["request"], a["value"]) for a in alts if a["metric"] == metric and a["level"] == level
                   and math.isfinite(a["value"])]
            if pts:
                x, y = zip(*pts)
                ax.scatter(x, y, marker=marker, s=90, facecolors=face, edgecolors="black", linewidths=1.2,
                           zorder=5)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} per request")
        ax.grid(True, alpha=0.3)
        worse_above = directions.get(metric, "below" if (w is not None and c is not None and c < w)
                                     else "above") == "above"
        direction = "higher is worse" if worse_above else "lower is worse"
        finite = [r for r in mrecs if math.isfinite(r["value"])]
        if finite:
            vals = [r["value"] for r in finite]
            worst = max(finite, key=lambda r: r["value"] if worse_above else -r["value"])
            judged = metric in directions or w is not None or c is not None
            s = (f"{metric}: {len(mrecs)} values over {len({str(r['layer']) for r in mrecs})} layer(s), "
                 f"range {format_number(min(vals))} to {format_number(max(vals))}; "
                 f"{'worst' if judged else 'largest'} "
                 f"{format_number(worst['value'])} at request {worst['request']} ({_layer_name(worst['layer'])})")
            if min(vals) == max(vals):
                notes.append(f"{metric} is constant ({format_number(vals[0])}).")
        else:
            s = f"{metric}: no finite values"
            notes.append(f"{metric} has no finite values to draw.")
        if w is not None or c is not None:
            s += (f"; thresholds warning {format_number(w) if w is not None else 'none'}, critical "
                  f"{format_number(c) if c is not None else 'none'} ({direction})")
        sentences.append(s + ".")
        for r in sorted(mrecs, key=lambda r: (r["request"], str(r["layer"]))):
            table.append({"request": r["request"], "timestamp": r["timestamp"], "layer": r["layer"],
                          "metric": metric, "value": r["value"],
                          "alert": alert_at.get((r["request"], str(r["layer"]), metric), "")})
    axes[-1, 0].set_xlabel("request number (in arrival order)")
    fig.suptitle(title)
    handles = [Line2D([], [], markersize=5, label=_layer_name(L), **_style(i)) for i, L in enumerate(layers)]
    handles += [Line2D([], [], color="black", linestyle="--", label="warning threshold (dashed)"),
                Line2D([], [], color="black", linestyle="-.", linewidth=1.8, label="critical threshold (dash-dot)")]
    handles += [Line2D([], [], marker=m, linestyle="none", markersize=9, markerfacecolor=face,
                       markeredgecolor="black", label=lab) for m, face, lab in ALERT_GLYPHS.values()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    shown_alerts = [a for a in alts if a["metric"] in chosen]
    counts = Counter(a["level"] for a in shown_alerts)
    alert_txt = (f"{len(shown_alerts)} alert(s): " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ALERT_GLYPHS))
    first_c = min((a for a in shown_alerts if a["level"] == "critical"), key=lambda a: a["request"], default=None)
    if first_c:
        alert_txt += (f"; the first critical alert is at request {first_c['request']} "
                      f"({_layer_name(first_c['layer'])}, {first_c['metric']} = {format_number(first_c['value'])}, "
                      f"threshold {format_number(_num(first_c['threshold'], 'threshold'))})")
    reqs = [r["request"] for r in recs]
    if min(reqs) == max(reqs):
        notes.append("Only one request was recorded, so there is no timeline yet.")
    names = [_layer_name(L) for L in layers]
    alt = (f"Monitor timeline over requests {min(reqs)}-{max(reqs)} ({len(set(reqs))} requests), "
           f"{len(layers)} series: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}. "
           + " ".join(sentences) + f" {alert_txt}.")
    return _finish(fig, alt, table, title, notes)


# =============================================================================================
# LO3: memory management, composition and compression (records from the analytics module)
# =============================================================================================
HEAD_KEYS = ("layer", "head", "kv_head", "eig_real", "eig_imag", "neg_share", "current_token_attention")
RANKING_KEYS = ("rank", "component", "kind", "layer", "index", "score", "evidence")


def plot_wov_spectra(heads, highlight: int = 3) -> AccessibleFigure:
    """W_OV eigenvalues of attention heads: which heads write *against* what they read.

    ``heads``: dicts ``{layer, head, kv_head, eig_real, eig_imag, neg_share, current_token_attention}``
    (eigenvalue lists of equal length; ``neg_share = sum_{Re<0}|lambda| / sum|lambda|``; the attention
    may be None when no activations were used).
    Left: every head as a point, negative-eigenvalue share against its mean attention to the current
    token; memory-management candidates (Elhage et al. 2021) sit top right. Right: the eigenvalues in
    the complex plane for the ``highlight`` heads with the largest negative share (ties broken by
    current-token attention; one colour + marker each); the hatched half-plane ``Re < 0`` is where a
    head removes what it reads.
    Table: one row per head in that order, with the summaries drawn (eigenvalue lists omitted).
    """
    recs = _records(heads, HEAD_KEYS, "head records")
    highlight = _int(highlight, "highlight")
    if highlight < 0:
        raise BandwidthInputError(f"highlight: expected >= 0, got {highlight}")
    title = "W_OV eigenvalues: heads that erase what they read"
    if not recs:
        return _placeholder(title, "No head records were given, so there is nothing to draw.",
                            "negative-eigenvalue share", "attention to current token")
    for i, r in enumerate(recs):
        re_, im_ = r["eig_real"], r["eig_imag"]
        if not isinstance(re_, (list, tuple, np.ndarray)) or not isinstance(im_, (list, tuple, np.ndarray)) \
                or len(re_) != len(im_):
            raise BandwidthInputError(f"head records[{i}]: eig_real and eig_imag must be lists of equal length")
        r["eig"] = np.asarray(re_, dtype=float) + 1j * np.asarray(im_, dtype=float)
        r["neg_share"] = _num(r["neg_share"], f"head records[{i}].neg_share")
        r["current_token_attention"] = _num(r["current_token_attention"],
                                            f"head records[{i}].current_token_attention")
        r["name"] = f"L{r['layer']}H{r['head']}"
    # largest negative share first; ties broken by attention to the current token (Elhage et al.'s
    # second criterion for memory management)
    order = sorted(recs, key=lambda r: (-np.nan_to_num(r["neg_share"], nan=-np.inf),
                                        -np.nan_to_num(r["current_token_attention"], nan=-np.inf)))
    top = order[:highlight]
    fig, axes = _figure((12, 5), ncols=2)
    ax, bx = axes[0, 0], axes[0, 1]
    notes = []
    att = np.array([r["current_token_attention"] for r in recs])
    neg = np.array([r["neg_share"] for r in recs])
    have_att = np.isfinite(att)
    if not have_att.any():
        notes.append("No head has a current-token attention value, so the left panel places all heads at 0.")
    y_all = np.where(have_att, att, 0.0)
    ax.scatter(neg, y_all, marker="o", s=28, facecolors="white", edgecolors="0.35", label="a head")
    for i, r in enumerate(top):
        st = _style(i)
        yv = r["current_token_attention"] if math.isfinite(r["current_token_attention"]) else 0.0
        ax.scatter([r["neg_share"]], [yv], marker=st["marker"], s=110, color=st["color"],
                   edgecolors="black", zorder=3)
        right = r["neg_share"] > 0.8  # keep the label inside the axes
        ax.annotate(r["name"], (r["neg_share"], yv), textcoords="offset points", xytext=(-8 if right else 6, 6 + 8 * i),
                    ha="right" if right else "left", fontsize=9)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("negative-eigenvalue share of W_OV\nsum |lambda| over Re(lambda) < 0 / sum |lambda|")
    ax.set_ylabel("mean attention to the current token\n(probability, 0-1)")
    ax.set_title(f"All {len(recs)} heads")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    bx.axvline(0, color="black", linewidth=1)
    bx.axhline(0, color="0.5", linewidth=0.8)
    for i, r in enumerate(top):
        st = _style(i)
        bx.scatter(r["eig"].real, r["eig"].imag, marker=st["marker"], s=36, color=st["color"],
                   edgecolors="black", linewidths=0.5, label=f"{r['name']} (share {format_number(r['neg_share'])})",
                   zorder=3)
    if top:
        reals = np.concatenate([r["eig"].real for r in top] + [np.zeros(1)])
        lo = float(reals.min())
        # hatch the half-plane Re < 0 over the drawn range (at least a sliver when nothing is negative)
        bx.axvspan(lo * 1.1 if lo < 0 else -0.05 * max(1.0, float(np.abs(reals).max())), 0,
                   facecolor="none", hatch="..", edgecolor="0.8", linewidth=0)
        bx.text(0.02, 0.97, "Re < 0: removes what it reads", transform=bx.transAxes, va="top", fontsize=9)
        bx.legend(loc="best", fontsize=8)
    else:
        _note(bx, "highlight=0: no head selected.")
    bx.set_xlabel("Re(lambda) (W_OV eigenvalue, residual units per unit read)")
    bx.set_ylabel("Im(lambda)")
    bx.set_title(f"Eigenvalues of the {len(top)} head(s) with the largest negative share")
    bx.grid(True, alpha=0.3)
    fig.suptitle(title)
    if len(recs) == 1:
        notes.append("Only one head was given.")
    finite_neg = neg[np.isfinite(neg)]
    if finite_neg.size == 0:
        notes.append("No head has a finite negative-eigenvalue share.")
    elif len(recs) > 1 and finite_neg.min() == finite_neg.max():
        notes.append("Every head has the same negative-eigenvalue share.")
    fin = neg[np.isfinite(neg)]
    layers = sorted({r["layer"] for r in recs})
    head_txt = "; ".join(
        f"{r['name']} has share {format_number(r['neg_share'])}, current-token attention "
        f"{format_number(r['current_token_attention']) if math.isfinite(r['current_token_attention']) else 'unknown'}, "
        f"{int((r['eig'].real < 0).sum())} of {r['eig'].size} eigenvalues with negative real part, most "
        f"negative {format_number(float(r['eig'].real.min())) if r['eig'].size else 'none'}"
        for r in top)
    alt = (f"Left: {len(recs)} attention heads in {len(layers)} layer(s); the negative-eigenvalue share of "
           f"W_OV ranges {format_number(float(fin.min())) if fin.size else 'n/a'} to "
           f"{format_number(float(fin.max())) if fin.size else 'n/a'} (median "
           f"{format_number(float(np.median(fin))) if fin.size else 'n/a'}). "
           + (f"Right: eigenvalues in the complex plane of the top {len(top)}: {head_txt}." if top else ""))
    table = [{"layer": r["layer"], "head": r["head"], "kv_head": r["kv_head"], "name": r["name"],
              "neg_share": r["neg_share"], "current_token_attention": r["current_token_attention"],
              "n_eigenvalues": int(r["eig"].size),
              "n_negative_real": int((r["eig"].real < 0).sum()),
              "min_real": float(r["eig"].real.min()) if r["eig"].size else float("nan"),
              "max_real": float(r["eig"].real.max()) if r["eig"].size else float("nan"),
              "highlighted": r in top} for r in order]
    return _finish(fig, alt, table, title, notes)


_KIND_HATCH = ["", "///", "...", "xxx", "\\\\\\", "ooo"]


def plot_memory_ranking(ranking, top: int = 15) -> AccessibleFigure:
    """Ranked memory-management candidates as horizontal bars (rank 1 at the top).

    ``ranking``: dicts ``{rank, component, kind, layer, index, score, evidence}``. The component kind
    (head, neuron, ...) is shown by colour *and* hatch *and* the bar's text label; each bar is
    labelled with its rank and score.
    Table: the shown records in rank order.
    """
    recs = _records(ranking, RANKING_KEYS, "ranking records")
    top = _positive_int(top, "top")
    title = "Memory-management candidates, ranked"
    if not recs:
        return _placeholder(title, "No ranking records were given, so there is nothing to draw.",
                            "score", "component")
    for i, r in enumerate(recs):
        r["rank"] = _int(r["rank"], f"ranking records[{i}].rank")
        r["score"] = _num(r["score"], f"ranking records[{i}].score")
    recs = sorted(recs, key=lambda r: r["rank"])
    shown = recs[:top]
    kinds = list(dict.fromkeys(str(r["kind"]) for r in recs))
    fig, axes = _figure((8.5, 1.6 + 0.38 * len(shown)))
    ax = axes[0, 0]
    y = np.arange(len(shown))[::-1]
    notes = []
    scores = np.array([r["score"] for r in shown])
    for yy, r in zip(y, shown):
        k = kinds.index(str(r["kind"]))
        ax.barh(yy, np.nan_to_num(r["score"]), color=OKABE_ITO[k % len(OKABE_ITO)],
                hatch=_KIND_HATCH[k % len(_KIND_HATCH)], edgecolor="black", linewidth=0.8)
        ax.text(np.nan_to_num(r["score"]), yy, f"  #{r['rank']} {r['kind']}, {format_number(r['score'])}",
                va="center", ha="left" if r["score"] >= 0 else "right", fontsize=9)
    ax.set_yticks(y)
    ax.set_yticklabels([str(r["component"]) for r in shown], fontsize=max(MIN_FONT, 10 - len(shown) // 15))
    ax.axvline(0, color="black", linewidth=0.8)
    fin = scores[np.isfinite(scores)]
    if fin.size:
        lo, hi = min(0.0, float(fin.min())), max(0.0, float(fin.max()))
        pad = 0.35 * (hi - lo) if hi > lo else 1.0
        ax.set_xlim(lo - (pad if lo < 0 else 0), hi + pad)
        if fin.min() == fin.max():
            notes.append(f"Every shown candidate has the same score ({format_number(float(fin[0]))}).")
    ax.set_xlabel("memory-management score (unitless, higher = stronger candidate)")
    ax.set_ylabel("component")
    ax.set_title(title)
    ax.legend(handles=[Patch(facecolor=OKABE_ITO[i % 8], hatch=_KIND_HATCH[i % len(_KIND_HATCH)],
                             edgecolor="black", label=k) for i, k in enumerate(kinds)],
              title="kind (colour + hatch)", loc="lower right", fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    if len(recs) > top:
        notes.append(f"Showing the top {top} of {len(recs)} candidates.")
    kind_counts = Counter(str(r["kind"]) for r in shown)
    alt = (f"Horizontal bars of the top {len(shown)} of {len(recs)} memory-management candidates "
           f"({', '.join(f'{v} {k}' for k, v in kind_counts.items())}). "
           + "; ".join(f"#{r['rank']} {r['component']} ({r['kind']}, layer {r['layer']}) score "
                       f"{format_number(r['score'])}" for r in shown[:5]) + ".")
    table = [{k: r[k] for k in RANKING_KEYS} for r in shown]
    return _finish(fig, alt, table, title, notes)


COMPOSITION_KEYS = ("kind", "src_labels", "dst_labels", "scores", "baseline_mean", "baseline_std")


def plot_composition_scores(comp: Mapping, n_std: float = 3.0, annotate_max_cells: int = 144
                            ) -> AccessibleFigure:
    """Composition scores between components with the random-matrix baseline.

    ``comp``: ``{kind, src_labels, dst_labels, scores, baseline_mean, baseline_std}``; ``scores`` is a
    2-D list (rows = source components, columns = destination components) with NaN where a pair does
    not compose (e.g. a later layer cannot feed an earlier one). The score is
    ``||W_A W_B||_F / (||W_A||_F ||W_B||_F)``. Cells above ``baseline_mean + n_std * baseline_std`` get
    a diamond glyph; not-applicable cells are hatched grey. The colour bar carries a line at the
    threshold. With at most ``annotate_max_cells`` cells every cell also shows its value.
    Table: every applicable pair with its score, z-score against the baseline and the flag.
    """
    if not isinstance(comp, Mapping):
        raise BandwidthInputError(f"composition: expected a dict with keys {list(COMPOSITION_KEYS)}, "
                                  f"got {type(comp).__name__}")
    missing = [k for k in COMPOSITION_KEYS if k not in comp]
    if missing:
        raise BandwidthInputError(f"composition: missing key(s) {missing}")
    kind = str(comp["kind"])
    src, dst = [str(s) for s in comp["src_labels"]], [str(s) for s in comp["dst_labels"]]
    try:
        scores = np.array(comp["scores"], dtype=float).reshape(len(src), len(dst)) if src and dst \
            else np.zeros((len(src), len(dst)))
    except (TypeError, ValueError):
        raise BandwidthInputError(f"composition: scores must be a {len(src)} x {len(dst)} list of numbers "
                                  "(rows = src_labels, columns = dst_labels)") from None
    mean = _num(comp["baseline_mean"], "baseline_mean", allow_nan=False)
    std = _num(comp["baseline_std"], "baseline_std", allow_nan=False)
    if std < 0:
        raise BandwidthInputError(f"baseline_std: must be >= 0, got {std}")
    n_std = _num(n_std, "n_std", allow_nan=False)
    thr = mean + n_std * std
    title = f"{kind} composition scores with the random baseline"
    if scores.size == 0 or not np.isfinite(scores).any():
        return _placeholder(title, "No applicable component pair has a score, so there is nothing to draw.",
                            "destination component", "source component")
    notes = []
    fig, axes = _figure((max(6.5, 2.5 + 0.28 * len(dst)), max(4.5, 1.8 + 0.26 * len(src))))
    ax = axes[0, 0]
    ax.set_facecolor("0.85")
    na = ~np.isfinite(scores)
    for a, b in zip(*np.nonzero(na)):
        ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.6",
                               linewidth=0, zorder=0))
    cnorm = _color_norm(scores, log=False, notes=notes, what="composition score")
    im = ax.imshow(np.where(na, np.nan, scores), aspect="auto", cmap=HEATMAP_CMAP, norm=cnorm,
                   interpolation="nearest", zorder=1)
    cb = fig.colorbar(im, ax=ax, label="composition score ||W_A W_B||_F / (||W_A||_F ||W_B||_F)")
    if cnorm.vmin <= thr <= cnorm.vmax:
        cb.ax.axhline(thr, color="white", linewidth=2.5)
        cb.ax.axhline(thr, color="black", linewidth=1.2, linestyle="--")
    above = np.isfinite(scores) & (scores > thr)
    ys, xs = np.nonzero(above)
    _glyph(ax, xs, ys, "D", _glyph_size(len(src), len(dst)) * 0.8,
           label=f"above baseline mean + {format_number(n_std)} std ({format_number(thr)})")
    if scores.size <= annotate_max_cells:
        for a in range(len(src)):
            for b in range(len(dst)):
                if np.isfinite(scores[a, b]):
                    rgba = im.cmap(cnorm(scores[a, b]))
                    light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.5
                    ax.text(b, a + 0.3, f"{scores[a, b]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if light else "white", zorder=5)
    _thin_ticks(ax, "x", dst, rotate=True)
    _thin_ticks(ax, "y", src)
    ax.set_xlabel("destination component (reads)")
    ax.set_ylabel("source component (writes)")
    ax.set_title(title)
    handles = [Line2D([], [], marker="D", linestyle="none", markersize=8, markerfacecolor="black",
                      markeredgecolor="white", label=f"above mean + {format_number(n_std)} std (diamond)"),
               Line2D([], [], color="black", linestyle="--",
                      label=f"threshold {format_number(thr)} (dashed line on the colour bar)")]
    if na.any():
        handles.append(Patch(facecolor="0.85", hatch="///", edgecolor="0.6", label="not applicable (hatched)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    if len(src) == 1 or len(dst) == 1:
        notes.append("Only one source or destination component: a single row or column.")
    if std == 0:
        notes.append("The baseline has zero spread, so any score above its mean is flagged.")
    z = (scores - mean) / std if std > 0 else np.where(scores > mean, np.inf, 0.0)
    applicable = int(np.isfinite(scores).sum())
    order = sorted(zip(*np.nonzero(np.isfinite(scores))), key=lambda ab: -scores[ab])
    best = "; ".join(f"{src[a]} -> {dst[b]} = {format_number(float(scores[a, b]))}"
                     + (f" ({format_number(float(z[a, b]))} std above the mean)" if std > 0 else "")
                     for a, b in order[:3])
    alt = (f"Heatmap of {kind} composition scores from {len(src)} source to {len(dst)} destination "
           f"components: {applicable} applicable pairs, {int(na.sum())} not applicable (hatched). Random "
           f"baseline {format_number(mean)} +/- {format_number(std)}; {int(above.sum())} pair(s) exceed "
           f"mean + {format_number(n_std)} std = {format_number(thr)} (diamonds). Scores range "
           f"{format_number(float(np.nanmin(scores)))} to {format_number(float(np.nanmax(scores)))}. "
           f"Strongest: {best}.")
    table = [{"kind": kind, "src": src[a], "dst": dst[b], "score": float(scores[a, b]),
              "z_vs_baseline": float(z[a, b]), "above_baseline": bool(above[a, b])}
             for a in range(len(src)) for b in range(len(dst)) if np.isfinite(scores[a, b])]
    return _finish(fig, alt, table, title, notes)


COMPRESSION_KEYS = ("layer", "k", "subspace", "loss", "kl", "delta_loss")


def plot_compression_curve(records, base_loss: float | None = None, tolerance: float | None = None,
                           d_model: int | None = None) -> AccessibleFigure:
    """The measured cost of squeezing the residual at layer L into k dimensions.

    ``records``: ``{layer, k, subspace, loss, kl, delta_loss}`` with ``subspace`` "pca" (the top-k
    principal directions) or "random" (a random k-dimensional subspace, the baseline);
    ``delta_loss = loss - base_loss`` in nats. ``tolerance`` is in the same unit as ``delta_loss``
    (nats; if the analytics states a relative tolerance, pass ``relative * base_loss``).
    Left: loss increase against k (log2 axis) with the tolerance line; right: KL to the unmodified
    model. Layers differ by colour + marker, subspaces by line style and filled/open markers.
    Table: the records with a ``within_tolerance`` flag.
    """
    recs = _records(records, COMPRESSION_KEYS, "compression records")
    title = "Measured compression cost: loss and KL when the residual is projected to k dimensions"
    if base_loss is not None:
        base_loss = _num(base_loss, "base_loss", allow_nan=False)
    if tolerance is not None:
        tolerance = _num(tolerance, "tolerance", allow_nan=False)
        if tolerance < 0:
            raise BandwidthInputError(f"tolerance: must be >= 0, got {tolerance}")
    if not recs:
        return _placeholder(title, "No compression records were given, so there is nothing to draw.",
                            "k", "loss increase (nats)")
    for i, r in enumerate(recs):
        if r["subspace"] not in ("pca", "random"):
            raise BandwidthInputError(f"compression records[{i}]: subspace {r['subspace']!r} is not 'pca' or 'random'")
        r["k"] = _positive_int(r["k"], f"compression records[{i}].k")
        for key in ("loss", "kl", "delta_loss"):
            r[key] = _num(r[key], f"compression records[{i}].{key}")
    layers = _sorted_values({r["layer"] for r in recs})
    fig, axes = _figure((12, 4.8), ncols=2)
    ax, bx = axes[0, 0], axes[0, 1]
    notes, sentences = [], []
    for i, L in enumerate(layers):
        st = _style(i)
        for sub, ls, face in (("pca", "-", st["color"]), ("random", "--", "white")):
            pts = sorted((r["k"], r["delta_loss"], r["kl"]) for r in recs if r["layer"] == L and r["subspace"] == sub)
            if not pts:
                continue
            k, dl, kl = map(np.array, zip(*pts))
            for axis, ys in ((ax, dl), (bx, kl)):
                axis.plot(k, ys, color=st["color"], linestyle=ls, marker=st["marker"], markersize=6,
                          markerfacecolor=face, markeredgecolor=st["color"], linewidth=1.6)
        pca = sorted((r["k"], r["delta_loss"], r["kl"]) for r in recs if r["layer"] == L and r["subspace"] == "pca")
        rnd = {r["k"]: r["delta_loss"] for r in recs if r["layer"] == L and r["subspace"] == "random"}
        if tolerance is not None and pca:
            ok = [k for k, dl, _ in pca if math.isfinite(dl) and dl <= tolerance]
            if ok:
                kmin = min(ok)
                dl = dict((k, d) for k, d, _ in pca)[kmin]
                s = (f"Layer {L}: the top {kmin} principal directions keep the loss increase within "
                     f"{format_number(tolerance)} nats ({'+' if dl >= 0 else ''}{format_number(dl)})")
                if kmin in rnd:
                    s += f"; a random {kmin}-dimensional subspace costs {'+' if rnd[kmin] >= 0 else ''}{format_number(rnd[kmin])}"
                sentences.append(s + ".")
            else:
                sentences.append(f"Layer {L}: no tested k (up to {max(k for k, _, _ in pca)}) keeps the loss "
                                 f"increase within {format_number(tolerance)} nats.")
        elif pca:
            k0, d0, _ = pca[0]
            sentences.append(f"Layer {L}: at k = {k0} the loss increase is {format_number(d0)} nats"
                             + (f" (random: {format_number(rnd[k0])})" if k0 in rnd else "") + ".")
    for axis, ylabel, sub in ((ax, "loss increase over the unmodified model (nats/token)", "next-token loss"),
                              (bx, "KL(unmodified || projected) (nats/token)", "KL divergence")):
        ks = sorted({r["k"] for r in recs})
        if len(ks) > 1 and ks[0] > 0:
            axis.set_xscale("log", base=2)
        axis.set_xlabel("k, dimensions kept (log2 scale)" if len(ks) > 1 else "k, dimensions kept")
        axis.set_ylabel(ylabel)
        axis.set_title(sub)
        axis.grid(True, alpha=0.3)
        if d_model:
            axis.axvline(d_model, color="0.4", linewidth=1, linestyle=":")
    if tolerance is not None:
        ax.axhline(tolerance, color="black", linestyle="-.", linewidth=1.2)
        ax.text(0.99, tolerance, f"tolerance {format_number(tolerance)} nats", transform=ax.get_yaxis_transform(),
                ha="right", va="bottom", fontsize=9, bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    handles = [Line2D([], [], color=_style(i)["color"], marker=_style(i)["marker"], label=f"layer {L}")
               for i, L in enumerate(layers)]
    handles += [Line2D([], [], color="0.3", linestyle="-", marker="o", markerfacecolor="0.3",
                       label="top-k principal directions (filled, solid)"),
                Line2D([], [], color="0.3", linestyle="--", marker="o", markerfacecolor="white",
                       label="random k-dim subspace (open, dashed)")]
    bx.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(title)
    if len({r["k"] for r in recs}) == 1:
        notes.append("Only one k was measured, so there is no curve yet.")
    if not any(r["subspace"] == "random" for r in recs):
        notes.append("No random-subspace baseline was given.")
    alt = (f"Loss increase and KL against the number of kept dimensions k, for {len(layers)} layer(s) "
           f"({', '.join(map(str, layers))})"
           + (f"; unmodified loss {format_number(base_loss)} nats" if base_loss is not None else "")
           + (f"; tolerance {format_number(tolerance)} nats" if tolerance is not None else "") + ". "
           + " ".join(sentences))
    table = [{**{k: r[k] for k in COMPRESSION_KEYS},
              "within_tolerance": (bool(r["delta_loss"] <= tolerance) if tolerance is not None else None)}
             for r in sorted(recs, key=lambda r: (str(r["layer"]), r["subspace"], r["k"]))]
    return _finish(fig, alt, table, title, notes)


# =============================================================================================
# The explorer's figure (one prompt, one layer)
# =============================================================================================
def plot_layer_explorer(report, capture, layer: int, prompt: int = 0,
                        massive_ratio: float = 4.0) -> AccessibleFigure:
    """What the interactive explorer shows for one layer of one prompt (three panels).

    1. residual norm per position at ``layer`` (log scale); massive positions hatched, starred and
       labelled "excluded" when the report left them out; the dashed line is the massive threshold;
    2. cumulative explained variance at ``layer`` with the ``p`` line and ``r_p`` marked: solid = the
       positions the report analysed (without massive ones when excluded), dotted = the other set;
    3. ``r_p`` across layers with the chosen layer ringed.
    Table: one row per layer, the report's numbers (see :func:`report_rows`).
    """
    _check_report(report)
    layer = _int(layer, "layer")
    if layer not in report.layers:
        raise BandwidthInputError(f"layer: {layer} not in the report (have {format_ranges(report.layers)})")
    j = report.layers.index(layer)
    p = report.variance_threshold
    pp = round(100 * p)
    excluded = bool(report.excluded_rows)
    used = report.without_massive[j]
    other = report.all_positions[j] if excluded else None
    rows = [i for i in range(capture.n_rows) if int(capture.prompt_index[i]) == prompt]
    norms = capture.get(report.kind, layer).double().norm(dim=1).numpy()
    median = float(np.median(norms))
    mass_rows = {m.row for m in report.massive if m.layer == layer}
    title = f"Layer {layer}: residual norms and bandwidth (r{pp})"
    fig, axes = _figure((14, 4.6), ncols=3)
    ax, bx, cx = axes[0]
    notes = []
    x = np.arange(len(rows))
    vals = norms[rows]
    is_m = np.array([r in mass_rows for r in rows], dtype=bool)
    ax.bar(x[~is_m], vals[~is_m], color=OKABE_ITO[0], edgecolor="black", linewidth=0.6)
    if is_m.any():
        ax.bar(x[is_m], vals[is_m], color=OKABE_ITO[3], edgecolor="black", linewidth=0.6, hatch="///")
        ax.plot(x[is_m], vals[is_m], linestyle="none", marker="*", markersize=12, color="black",
                markeredgecolor="white")
    if median > 0:
        ax.axhline(median, color="black", linestyle=":", linewidth=1)
        ax.axhline(massive_ratio * median, color="black", linestyle="--", linewidth=1)
    if (vals > 0).all():
        ax.set_yscale("log")
    _thin_ticks(ax, "x", [f"{int(capture.position[r])} {token_label(capture.tokens[r])}" for r in rows], rotate=True)
    ax.set_xlabel("position and token")
    ax.set_ylabel("residual norm ||x|| (residual units, log scale)")
    ax.set_title(f"Norm per position (prompt {prompt})")
    ax.legend(handles=[Patch(facecolor=OKABE_ITO[0], edgecolor="black", label="ordinary position"),
                       Patch(facecolor=OKABE_ITO[3], hatch="///", edgecolor="black",
                             label="massive (star)" + (", excluded" if excluded else ", kept")),
                       Line2D([], [], color="black", linestyle=":", label="median norm (all prompts)"),
                       Line2D([], [], color="black", linestyle="--",
                              label=f"{format_number(massive_ratio)}x median (massive threshold)")],
              loc="upper right", fontsize=8)
    for m, ls, lab in ((used, "-", "analysed positions" + (" (massive excluded)" if excluded else "")),
                       (other, ":", "all positions (massive included)")):
        if m is None:
            continue
        lam = np.asarray(m.eigenvalues, dtype=float)
        cum = np.cumsum(lam) / lam.sum()
        k = np.arange(1, cum.size + 1)
        bx.plot(k, cum, linestyle=ls, color=OKABE_ITO[0] if ls == "-" else OKABE_ITO[3],
                marker="o" if ls == "-" else "s", markevery=max(1, cum.size // 8), markersize=5, label=lab)
        bx.plot([m.variance_rank], [cum[m.variance_rank - 1]], marker="|", markersize=16, color="black")
    bx.axhline(p, color="black", linestyle="--", linewidth=1)
    bx.set_ylim(0, 1.02)
    bx.set_xlabel("principal components k")
    bx.set_ylabel("share of variance in the top k")
    bx.set_title(f"Cumulative variance, r{pp} = {used.variance_rank} (| marks r{pp})")
    bx.legend(loc="lower right", fontsize=8)
    bx.grid(True, alpha=0.3)
    ranks = [m.variance_rank for m in report.without_massive]
    cx.plot(report.layers, ranks, label=f"r{pp}" + (" without massive" if excluded else ""), **_style(0))
    if excluded:
        cx.plot(report.layers, [m.variance_rank for m in report.all_positions], label=f"r{pp} all positions",
                **_style(3))
    cx.scatter([layer], [used.variance_rank], s=220, facecolors="none", edgecolors="black", linewidths=2,
               zorder=4, label=f"layer {layer} (ring)")
    cx.set_xlabel("layer (block index)")
    cx.set_ylabel(f"r{pp} (dimensions)")
    cx.set_title(f"r{pp} by layer")
    cx.legend(loc="best", fontsize=8)
    cx.grid(True, alpha=0.3)
    fig.suptitle(title)
    if len(rows) == 1:
        notes.append("The prompt has a single token.")
    loud = [r for r in rows if r in mass_rows]
    loud_txt = ("; ".join(f"position {int(capture.position[r])} {capture.tokens[r]!r} is massive (norm "
                          f"{format_number(float(norms[r]))} = {format_number(float(norms[r] / median))} "
                          f"times the median {format_number(median)})" for r in loud[:3])
                + (", excluded from the spectrum." if excluded else ", kept in the spectrum.")
                if loud else "No position is massive at this layer.")
    alt = (f"Prompt {prompt}, {len(rows)} tokens, layer {layer}. {loud_txt} With {used.n_positions} "
           f"positions analysed, {pp}% of the variance lies in r{pp} = {used.variance_rank} of "
           f"min(n, d) = {min(used.n_positions, used.d_model)} available directions (utilization "
           f"{format_percent(used.utilization_available)}; {format_percent(used.utilization_d_model)} of "
           f"d_model {used.d_model})"
           + (f"; with the massive position(s) included r{pp} = {other.variance_rank}" if other else "")
           + f". Across layers r{pp} ranges {min(ranks)} to {max(ranks)}.")
    return _finish(fig, alt, report_rows(report, selected=layer), title, notes)


def report_rows(report, selected: int | None = None) -> list[dict]:
    """One dict per layer with the numbers of a :class:`BandwidthReport` (used as a table)."""
    _check_report(report)
    p = round(100 * report.variance_threshold)
    rows = []
    for a, c in zip(report.all_positions, report.without_massive):
        row = {"layer": a.layer, f"r{p}_all": a.variance_rank, f"r{p}": c.variance_rank,
               "participation_ratio": c.participation_ratio, "stable_rank": c.stable_rank,
               "entropy_rank": c.entropy_rank, "util_available": c.utilization_available,
               "util_d_model": c.utilization_d_model, "n_positions": c.n_positions,
               "excluded_positions": c.excluded_positions}
        if selected is not None:
            row["selected"] = a.layer == selected
        rows.append(row)
    return rows


# =============================================================================================
# Writing every figure
# =============================================================================================
def _md_alt(text: str) -> str:
    """Alt text safe inside ``![...](...)``."""
    return text.replace("\n", " ").replace("[", "(").replace("]", ")")


def build_figures(report=None, capture=None, *, analytics: Mapping | None = None,
                  monitor: Mapping | None = None, prompt: int = 0) -> list[tuple[str, AccessibleFigure]]:
    """Every figure the inputs allow, as ``(file stem, AccessibleFigure)`` pairs.

    ``analytics`` may hold any of: ``"bottlenecks"`` (records), ``"wov_heads"`` (head records),
    ``"memory_ranking"`` (ranking records), ``"composition"`` (one composition dict or a list of
    them), ``"compression"`` (``{"records": [...], "base_loss": x, "tolerance": t, "d_model": d}``).
    ``monitor`` may hold ``{"records": [...], "alerts": [...], "thresholds": {...}, "directions": {...}}``
    (from ``BandwidthMonitor``: ``timeline_records()``, ``alert_records()``, ``thresholds``,
    ``threshold_directions``).
    """
    made: list[tuple[str, AccessibleFigure]] = []
    if report is not None:
        made += [("rank_by_layer", plot_rank_by_layer(report)),
                 ("utilization_by_layer", plot_utilization_by_layer(report)),
                 ("singular_spectra", plot_singular_spectra(report)),
                 ("cumulative_variance", plot_cumulative_variance(report))]
        if capture is not None:
            made += [("norm_by_layer", plot_massive_norms(report, capture)),
                     ("norm_heatmap", plot_norm_heatmap(capture, report, prompt=prompt))]
    analytics = analytics or {}
    if not isinstance(analytics, Mapping):
        raise BandwidthInputError(f"analytics: expected a dict, got {type(analytics).__name__}")
    if analytics.get("bottlenecks") is not None:
        made.append(("bottleneck_heatmap", plot_bottleneck_heatmap(analytics["bottlenecks"], prompt=None)))
    if analytics.get("wov_heads") is not None:
        made.append(("wov_spectra", plot_wov_spectra(analytics["wov_heads"])))
    if analytics.get("memory_ranking") is not None:
        made.append(("memory_ranking", plot_memory_ranking(analytics["memory_ranking"])))
    comp = analytics.get("composition")
    if comp is not None:
        comps = [comp] if isinstance(comp, Mapping) else list(comp)
        for c in comps:
            made.append((f"composition_{str(c.get('kind', 'x')).lower()}", plot_composition_scores(c)))
    cc = analytics.get("compression")
    if cc is not None:
        if not isinstance(cc, Mapping):
            raise BandwidthInputError("analytics['compression']: expected {'records': [...], 'base_loss': ..., "
                                      "'tolerance': ...}")
        made.append(("compression_curve", plot_compression_curve(
            cc.get("records"), base_loss=cc.get("base_loss"), tolerance=cc.get("tolerance"),
            d_model=cc.get("d_model"))))
    if monitor is not None:
        if not isinstance(monitor, Mapping):
            raise BandwidthInputError(f"monitor: expected a dict, got {type(monitor).__name__}")
        made.append(("monitor_timeline", plot_monitor_timeline(
            monitor.get("records"), monitor.get("alerts"), monitor.get("thresholds"),
            directions=monitor.get("directions"))))
    return made


def write_figures(report, capture, out_dir, *, analytics: Mapping | None = None,
                  monitor: Mapping | None = None, prompt: int = 0, dpi: int = 120) -> list[dict]:
    """Write every figure as PNG, its full table as CSV, and ``figures.md`` (alt texts and tables).

    Returns the index: one dict per figure with ``file``, ``csv``, ``title``, ``alt_text``.
    Each figure is closed after saving. See :func:`build_figures` for ``analytics`` / ``monitor``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index, md = [], ["# Figures", "",
                     "Every figure with its alt text (also the image's alt attribute) and its data table.", ""]
    for stem, af in build_figures(report, capture, analytics=analytics, monitor=monitor, prompt=prompt):
        name, table_name = f"{stem}.png", f"{stem}.csv"
        try:
            af.save(out / name, dpi=dpi)
            af.write_csv(out / table_name)
        finally:
            af.close()
        index.append({"file": name, "csv": table_name, "title": af.title, "alt_text": af.alt_text})
        md += [f"## {af.title}", "", f"![{_md_alt(af.alt_text)}]({name})", "", af.alt_text, "",
               af.table_markdown(), "", f"Full table: [{table_name}]({table_name})", ""]
    (out / "figures.md").write_text("\n".join(md))
    return index


class BandwidthVisualizer:
    """The seed lesson's name, kept as a thin namespace over this module's functions.

    Every method returns an :class:`AccessibleFigure`. The seed's ``plot_subspace_specialization``
    (bars over coordinate slices "0:256 = token content") has no replacement on purpose: the residual
    stream has no privileged basis; :meth:`plot_singular_spectra` shows the basis-free picture.
    """
    plot_singular_spectra = staticmethod(plot_singular_spectra)
    plot_cumulative_variance = staticmethod(plot_cumulative_variance)
    plot_rank_by_layer = staticmethod(plot_rank_by_layer)
    plot_utilization_by_layer = staticmethod(plot_utilization_by_layer)
    plot_massive_norms = staticmethod(plot_massive_norms)
    plot_norm_heatmap = staticmethod(plot_norm_heatmap)
    plot_bottleneck_heatmap = staticmethod(plot_bottleneck_heatmap)
    plot_wov_spectra = staticmethod(plot_wov_spectra)
    plot_memory_ranking = staticmethod(plot_memory_ranking)
    plot_composition_scores = staticmethod(plot_composition_scores)
    plot_compression_curve = staticmethod(plot_compression_curve)
    plot_monitor_timeline = staticmethod(plot_monitor_timeline)
    #: the seed's name for the monitor timeline
    plot_bandwidth_utilization_timeline = plot_monitor_timeline  # (already a staticmethod here)
    plot_layer_explorer = staticmethod(plot_layer_explorer)
    write_figures = staticmethod(write_figures)
