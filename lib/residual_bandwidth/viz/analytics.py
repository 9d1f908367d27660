"""Figures of the analytics records: the bottleneck heatmap (LO2), W_OV spectra, memory-management
ranking, composition scores and the measured compression curve (LO3)."""
from __future__ import annotations

import math
from collections import Counter
from typing import Mapping

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from ..bottlenecks import GRID_KEYS, SEVERITIES
from ..memory import HEAD_KEYS, RANKING_KEYS
from ..validation import BandwidthInputError
from .core import (AccessibleFigure, format_number, format_ranges, HEATMAP_CMAP, MIN_FONT, OKABE_ITO, styled,
                   token_label, _color_norm, _figure, _finish, _glyph, _glyph_size, _int, _note, _num,
                   _nothing, _placeholder, _positive_int, _records, _sorted_values, _style, _thin_ticks)


#: How a bottleneck severity is drawn on the heatmap: (marker, legend text). "none" has no glyph.
SEVERITY_GLYPHS = {
    "warning": ("^", "warning (triangle)"),
    "critical": ("X", "critical (cross)"),
    "massive": ("*", "massive row (star, hatched, left out of the colour scale)"),
}


# =============================================================================================
# LO2: bottlenecks (records from the bottlenecks module)
# =============================================================================================


@styled
def plot_bottleneck_heatmap(records, prompt: int | None = None, value: str = "score",
                            max_positions: int = 64) -> AccessibleFigure:
    """Bottleneck ``value`` (default ``score``) by layer and position for one prompt.

    ``records``: dicts with ``layer, prompt, position, token, norm_ratio, spread, score, severity,
    massive``; ``severity`` is "none", "warning", "critical" or "massive". Severities are glyphs
    (triangle, cross, star; see :data:`SEVERITY_GLYPHS`), not colours. Massive-activation cells are
    hatched and left out of the colour scale: they are a different phenomenon (one loud direction)
    and would otherwise squash every other cell into one colour. ``prompt=None`` shows the prompt
    with the most warning and critical cells (the lowest-numbered one on a tie).
    Table: the records of the shown prompt, sorted by layer and position.
    """
    if value not in ("score", "norm_ratio", "spread"):
        raise BandwidthInputError(f"value: expected 'score', 'norm_ratio' or 'spread', got {value!r}")
    recs = _records(records, GRID_KEYS, "bottleneck records", ints=("layer", "prompt", "position"),
                    nums=("norm_ratio", "spread", "score"), choices={"severity": SEVERITIES})
    max_positions = _positive_int(max_positions, "max_positions")
    title = f"Bottleneck {value.replace('_', ' ')} by layer and position"
    if not recs:
        return _placeholder(title, _nothing("bottleneck records"), "position", "layer")
    for r in recs:
        r["massive"] = bool(r["massive"]) or r["severity"] == "massive"
    prompts = sorted({r["prompt"] for r in recs})
    flags = {q: sum(r["prompt"] == q and r["severity"] in ("warning", "critical") for r in recs) for q in prompts}
    prompt = _int(max(prompts, key=flags.get) if prompt is None else prompt, "prompt")
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
    tok, grid, sev = _bottleneck_grid(rows, layers, positions, value)
    fig, axes = _figure((max(6.5, 1.6 + 0.34 * len(positions)), max(4.0, 1.8 + 0.2 * len(layers))))
    ax = axes[0, 0]
    _bottleneck_cells(fig, ax, grid, sev, value, notes)
    _thin_ticks(ax, "x", [f"{q} {token_label(tok[q])}" for q in positions], rotate=True)
    _thin_ticks(ax, "y", [str(L) for L in layers])
    ax.set_xlabel("position and token")
    ax.set_ylabel("layer (block index)")
    ax.set_title(title + f" (prompt {prompt})")
    _severity_legend(fig)
    if len(layers) == 1:
        notes.append("Only one layer has records.")
    if len(positions) == 1:
        notes.append("The prompt has records for a single position.")
    alt = _bottleneck_alt(value, prompt, len(prompts), positions, layers, sev, rows, tok)
    table = [{k: r[k] for k in GRID_KEYS} for r in rows]
    return _finish(fig, alt, table, title, notes)


# =============================================================================================
# LO3: memory management, composition and compression (records from the analytics module)
# =============================================================================================



def _bottleneck_cells(fig, ax, grid, sev, value, notes) -> None:
    """The heatmap (massive cells hatched and out of the colour scale) and the severity glyphs."""
    colour = np.where(sev == "massive", np.nan, grid)
    ax.set_facecolor("0.85")
    cnorm = _color_norm(colour, log=False, notes=notes, what=value)
    im = ax.imshow(colour, aspect="auto", origin="lower", cmap=HEATMAP_CMAP, norm=cnorm,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label=f"{value.replace('_', ' ')} (unitless; massive cells excluded)")
    for a, b in zip(*np.nonzero(sev == "massive")):
        ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.25",
                               linewidth=0))
    size = _glyph_size(*grid.shape)
    for s, (marker, label) in SEVERITY_GLYPHS.items():
        ys, xs = np.nonzero(sev == s)
        _glyph(ax, xs, ys, marker, size * (1.4 if s == "massive" else 1.0), label=label,
               light=(s == "massive"))


def _bottleneck_grid(rows, layers, positions, value):
    """``(token of each position, value grid [layer, position], severity grid)`` of one prompt."""
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
    return tok, grid, sev


def _severity_legend(fig) -> None:
    """The bottleneck heatmap's legend: a glyph per severity, the hatch of massive cells."""
    handles = [Line2D([], [], marker=m, linestyle="none", markersize=9, markerfacecolor="black",
                      markeredgecolor="white", label=lab) for s, (m, lab) in SEVERITY_GLYPHS.items()
               if s != "massive"]
    handles.append(Patch(facecolor="0.85", hatch="///", edgecolor="0.25",
                         label=SEVERITY_GLYPHS["massive"][1]))
    handles.append(Patch(facecolor="white", edgecolor="0.5", label="no glyph: severity none"))
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)


def _bottleneck_alt(value, prompt, n_prompts, positions, layers, sev, rows, tok) -> str:
    """The heatmap's alt text: counts by severity, the highest cell, critical and massive cells."""
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
    mass_txt = "; ".join(f"position {q} {tok[q]!r} is a massive row at layers "
                         f"{format_ranges([r['layer'] for r in rows if r['massive'] and r['position'] == q])}"
                         for q in mass_pos[:4])
    return (f"Heatmap of bottleneck {value} for prompt {prompt}"
            + (f" (1 of {n_prompts} prompts)" if n_prompts > 1 else "")
            + f": {len(positions)} positions x {len(layers)} layers. Cells by severity: {count_txt}. "
            + top_txt + (" " + crit_txt if crit_txt else "")
            + (" " + mass_txt[:1].upper() + mass_txt[1:] + " (hatched, starred, excluded from the colour scale)."
               if mass_txt else ""))


@styled
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
    recs = _records(heads, HEAD_KEYS, "head records", nums=("neg_share", "current_token_attention"))
    highlight = _int(highlight, "highlight")
    if highlight < 0:
        raise BandwidthInputError(f"highlight: expected >= 0, got {highlight}")
    title = "W_OV eigenvalues: heads that erase what they read"
    if not recs:
        return _placeholder(title, _nothing("head records"), "negative-eigenvalue share", "attention to current token")
    _wov_records(recs)
    # largest negative share first; ties broken by attention to the current token (Elhage et al.'s
    # second criterion for memory management)
    order = sorted(recs, key=lambda r: (-np.nan_to_num(r["neg_share"], nan=-np.inf),
                                        -np.nan_to_num(r["current_token_attention"], nan=-np.inf)))
    top = order[:highlight]
    fig, axes = _figure((12, 5), ncols=2)
    ax, bx = axes[0, 0], axes[0, 1]
    notes = []
    neg = _wov_heads_panel(ax, recs, top, notes)
    _wov_eigen_panel(bx, top)
    fig.suptitle(title)
    if len(recs) == 1:
        notes.append("Only one head was given.")
    finite_neg = neg[np.isfinite(neg)]
    if finite_neg.size == 0:
        notes.append("No head has a finite negative-eigenvalue share.")
    elif len(recs) > 1 and finite_neg.min() == finite_neg.max():
        notes.append("Every head has the same negative-eigenvalue share.")
    alt = _wov_alt(recs, top, neg)
    table = _wov_table(order, top)
    return _finish(fig, alt, table, title, notes)


def _wov_records(recs) -> None:
    """Check the eigenvalue lists; add ``eig`` (complex array) and ``name`` to each record."""
    for i, r in enumerate(recs):
        re_, im_ = r["eig_real"], r["eig_imag"]
        if not isinstance(re_, (list, tuple, np.ndarray)) or not isinstance(im_, (list, tuple, np.ndarray)) \
                or len(re_) != len(im_):
            raise BandwidthInputError(f"head records[{i}]: eig_real and eig_imag must be lists of equal length")
        r["eig"] = np.asarray(re_, dtype=float) + 1j * np.asarray(im_, dtype=float)
        r["name"] = f"L{r['layer']}H{r['head']}"


def _wov_heads_panel(ax, recs, top, notes) -> np.ndarray:
    """Left panel: every head's negative share against its current-token attention; returns the shares."""
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
    return neg


def _wov_eigen_panel(bx, top) -> None:
    """Right panel: the eigenvalues of the highlighted heads in the complex plane."""
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


def _wov_alt(recs, top, neg) -> str:
    """Alt text: the range of the shares, then each highlighted head's numbers."""
    fin = neg[np.isfinite(neg)]
    layers = sorted({r["layer"] for r in recs})
    head_txt = "; ".join(
        f"{r['name']} has share {format_number(r['neg_share'])}, current-token attention "
        f"{format_number(r['current_token_attention']) if math.isfinite(r['current_token_attention']) else 'unknown'}, "
        f"{int((r['eig'].real < 0).sum())} of {r['eig'].size} eigenvalues with negative real part, most "
        f"negative {format_number(float(r['eig'].real.min())) if r['eig'].size else 'none'}"
        for r in top)
    return (f"Left: {len(recs)} attention heads in {len(layers)} layer(s); the negative-eigenvalue share of "
            f"W_OV ranges {format_number(float(fin.min())) if fin.size else 'n/a'} to "
            f"{format_number(float(fin.max())) if fin.size else 'n/a'} (median "
            f"{format_number(float(np.median(fin))) if fin.size else 'n/a'}). "
            + (f"Right: eigenvalues in the complex plane of the top {len(top)}: {head_txt}." if top else ""))


def _wov_table(order, top) -> list[dict]:
    return [{"layer": r["layer"], "head": r["head"], "kv_head": r["kv_head"], "name": r["name"],
             "neg_share": r["neg_share"], "current_token_attention": r["current_token_attention"],
             "n_eigenvalues": int(r["eig"].size), "n_negative_real": int((r["eig"].real < 0).sum()),
             "min_real": float(r["eig"].real.min()) if r["eig"].size else float("nan"),
             "max_real": float(r["eig"].real.max()) if r["eig"].size else float("nan"),
             "highlighted": r in top} for r in order]


_KIND_HATCH = ["", "///", "...", "xxx", "\\\\\\", "ooo"]


@styled
def plot_memory_ranking(ranking, top: int = 15) -> AccessibleFigure:
    """Ranked memory-management candidates as horizontal bars (rank 1 at the top).

    ``ranking``: dicts ``{rank, component, kind, layer, index, score, evidence}``. The component kind
    (head, neuron, ...) is shown by colour *and* hatch *and* the bar's text label; each bar is
    labelled with its rank and score.
    Table: the shown records in rank order.
    """
    recs = _records(ranking, RANKING_KEYS, "ranking records", ints=("rank",), nums=("score",))
    top = _positive_int(top, "top")
    title = "Memory-management candidates, ranked"
    if not recs:
        return _placeholder(title, _nothing("ranking records"), "score", "component")
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


@styled
def plot_composition_scores(comp: Mapping, n_std: float = 3.0, annotate_max_cells: int = 144,
                            threshold: float | None = None, threshold_label: str = "family-wise threshold"
                            ) -> AccessibleFigure:
    """Composition scores between components with the random-matrix baseline.

    ``comp``: ``{kind, src_labels, dst_labels, scores, baseline_mean, baseline_std}``; ``scores`` is a
    2-D list (rows = source components, columns = destination components) with NaN where a pair does
    not compose (e.g. a later layer cannot feed an earlier one). The score is
    ``||W_A W_B||_F / (||W_A||_F ||W_B||_F)``. Cells above ``baseline_mean + n_std * baseline_std`` get
    a diamond glyph; not-applicable cells are hatched grey. The colour bar carries a line at the
    threshold. With at most ``annotate_max_cells`` cells every cell also shows its value. ``threshold``
    (or the ``comp``'s own ``"threshold"``/``"threshold_label"`` keys, as the lesson job writes them),
    e.g. the family-wise threshold of :func:`~residual_bandwidth.composition.pair_significance`,
    replaces ``mean + n_std * std`` as the line and the diamonds, named ``threshold_label``. Table:
    every applicable pair with its score, z-score against the baseline and the flag.
    """
    kind, src, dst, scores, mean, std, n_std, threshold, label = _composition_inputs(comp, n_std, threshold, threshold_label)
    thr = mean + n_std * std if threshold is None else _num(threshold, "threshold", allow_nan=False)
    short = f"mean + {format_number(n_std)} std" if threshold is None else label
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
           label=f"above {'baseline ' if threshold is None else ''}{short} ({format_number(thr)})")
    if scores.size <= annotate_max_cells:
        _annotate_cells(ax, im, cnorm, scores)
    _thin_ticks(ax, "x", dst, rotate=True)
    _thin_ticks(ax, "y", src)
    ax.set_xlabel("destination component (reads)")
    ax.set_ylabel("source component (writes)")
    ax.set_title(title)
    _composition_legend(fig, short, thr, na.any())
    if len(src) == 1 or len(dst) == 1:
        notes.append("Only one source or destination component: a single row or column.")
    if std == 0:
        notes.append("The baseline has zero spread, so any score above its mean is flagged.")
    z = (scores - mean) / std if std > 0 else np.where(scores > mean, np.inf, 0.0)
    alt = _composition_alt(kind, src, dst, scores, na, above, z if threshold is None else None, (mean, std, short, thr))
    table = [{"kind": kind, "src": src[a], "dst": dst[b], "score": float(scores[a, b]),
              "z_vs_baseline": float(z[a, b]), ("above_baseline" if threshold is None else "above_threshold"): bool(above[a, b])}
             for a in range(len(src)) for b in range(len(dst)) if np.isfinite(scores[a, b])]
    return _finish(fig, alt, table, title, notes)


def _composition_inputs(comp, n_std, threshold, label):
    """Checked ``(kind, src labels, dst labels, scores [src, dst], baseline mean, std, n_std, threshold,
    label)``; the threshold and its label come from ``comp`` when the caller gives none."""
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
    if threshold is None and comp.get("threshold") is not None:
        threshold, label = comp["threshold"], str(comp.get("threshold_label", label))
    return kind, src, dst, scores, mean, std, n_std, threshold, label


def _annotate_cells(ax, im, cnorm, scores) -> None:
    """Each applicable cell's value, in black or white to stay readable on its colour."""
    for a in range(scores.shape[0]):
        for b in range(scores.shape[1]):
            if np.isfinite(scores[a, b]):
                rgba = im.cmap(cnorm(scores[a, b]))
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.5
                ax.text(b, a + 0.3, f"{scores[a, b]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if light else "white", zorder=5)


def _composition_legend(fig, short, thr, any_na) -> None:
    handles = [Line2D([], [], marker="D", linestyle="none", markersize=8, markerfacecolor="black",
                      markeredgecolor="white", label=f"above {short} (diamond)"),
               Line2D([], [], color="black", linestyle="--",
                      label=f"threshold {format_number(thr)} (dashed line on the colour bar)")]
    if any_na:
        handles.append(Patch(facecolor="0.85", hatch="///", edgecolor="0.6", label="not applicable (hatched)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)


def _composition_alt(kind, src, dst, scores, na, above, z, baseline) -> str:
    """Alt text: pairs, the baseline and how many exceed it, the range and the strongest pairs (with their
    distance from the mean in baseline std only under the per-pair std rule: ``z`` is None otherwise)."""
    mean, std, short, thr = baseline
    applicable = int(np.isfinite(scores).sum())
    order = sorted(zip(*np.nonzero(np.isfinite(scores))), key=lambda ab: -scores[ab])
    best = "; ".join(f"{src[a]} -> {dst[b]} = {format_number(float(scores[a, b]))}"
                     + (f" ({format_number(float(z[a, b]))} std above the mean)" if z is not None and std > 0 else "")
                     for a, b in order[:3])
    return " ".join([
        f"Heatmap of {kind} composition scores from {len(src)} source to {len(dst)} destination components:",
        f"{applicable} applicable pairs, {int(na.sum())} not applicable (hatched).",
        f"Random baseline {format_number(mean)} +/- {format_number(std)}; {int(above.sum())} pair(s) exceed",
        f"{short} = {format_number(thr)} (diamonds).",
        f"Scores range {format_number(float(np.nanmin(scores)))} to {format_number(float(np.nanmax(scores)))}.",
        f"Strongest: {best}."])


COMPRESSION_KEYS = ("layer", "k", "subspace", "loss", "kl", "delta_loss")


@styled
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
    recs = _records(records, COMPRESSION_KEYS, "compression records", nums=("loss", "kl", "delta_loss"),
                    choices={"subspace": ("pca", "random")})
    title = "Measured compression cost: loss and KL when the residual is projected to k dimensions"
    if base_loss is not None:
        base_loss = _num(base_loss, "base_loss", allow_nan=False)
    if tolerance is not None:
        tolerance = _num(tolerance, "tolerance", allow_nan=False)
        if tolerance < 0:
            raise BandwidthInputError(f"tolerance: must be >= 0, got {tolerance}")
    if not recs:
        return _placeholder(title, _nothing("compression records"), "k", "loss increase (nats)")
    for i, r in enumerate(recs):
        r["k"] = _positive_int(r["k"], f"compression records[{i}].k")
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
        sentences += _compression_sentence(L, recs, tolerance)
    _compression_axes(ax, bx, recs, d_model, tolerance)
    _compression_legend(bx, layers)
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


def _compression_sentence(L, recs, tolerance) -> list[str]:
    """The alt-text sentence of one layer: the smallest k within tolerance (and what a random subspace of
    that size costs), or the cost at the smallest k when no tolerance is given."""
    out = []
    pca = sorted((r["k"], r["delta_loss"], r["kl"]) for r in recs if r["layer"] == L and r["subspace"] == "pca")
    rnd = {r["k"]: r["delta_loss"] for r in recs if r["layer"] == L and r["subspace"] == "random"}
    if tolerance is not None and pca:
        ok = [k for k, dl, _ in pca if math.isfinite(dl) and dl <= tolerance]
        if ok:
            kmin = min(ok)
            dl = dict((k, d) for k, d, _ in pca)[kmin]
            s = (f"Layer {L}: the top {kmin} principal directions keep the average loss increase within "
                 f"{format_number(tolerance)} nats ({'+' if dl >= 0 else ''}{format_number(dl)}, a point estimate)")
            if kmin in rnd:
                s += f"; a random {kmin}-dimensional subspace costs {'+' if rnd[kmin] >= 0 else ''}{format_number(rnd[kmin])}"
            out.append(s + ".")
        else:
            out.append(f"Layer {L}: no tested k (up to {max(k for k, _, _ in pca)}) keeps the loss "
                       f"increase within {format_number(tolerance)} nats.")
    elif pca:
        k0, d0, _ = pca[0]
        out.append(f"Layer {L}: at k = {k0} the loss increase is {format_number(d0)} nats"
                   + (f" (random: {format_number(rnd[k0])})" if k0 in rnd else "") + ".")
    return out


def _compression_axes(ax, bx, recs, d_model, tolerance) -> None:
    """Axis labels and scales of both panels, the d_model line and the tolerance line."""
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


def _compression_legend(bx, layers) -> None:
    handles = [Line2D([], [], color=_style(i)["color"], marker=_style(i)["marker"], label=f"layer {L}")
               for i, L in enumerate(layers)]
    handles += [Line2D([], [], color="0.3", linestyle="-", marker="o", markerfacecolor="0.3",
                       label="top-k principal directions (filled, solid)"),
                Line2D([], [], color="0.3", linestyle="--", marker="o", markerfacecolor="white",
                       label="random k-dim subspace (open, dashed)")]
    bx.legend(handles=handles, loc="upper right", fontsize=8)
