"""Figures of the per-layer bandwidth report (LO1): spectra, cumulative variance, ranks and
utilization by layer, massive activations and token norms, and the explorer's one-layer view."""
from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..convergence import width_rule
from ..validation import BandwidthInputError, check_positive
from .core import (AccessibleFigure, format_number, format_percent, format_ranges, HEATMAP_CMAP, OKABE_ITO,
                   styled, token_label, _check_report, _color_norm, _figure, _finish, _glyph, _glyph_size,
                   _int, _layer_lines, _one_layer_note, _pick_layers, _placeholder, _positive_int,
                   _report_layers, _style, _thin_ticks, _which)


# =============================================================================================
# LO1: spectra and ranks (foundation data)
# =============================================================================================
@styled
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
                  ("participation_ratio", "participation ratio", "o"), ("stable_rank", "stable rank", "s"),
                  ("entropy_rank", "entropy effective rank", "^")]
    n_zero_total = 0
    for i, L in enumerate(chosen):
        n_zero, sentence = _spectrum_line(ax, i, L, by_layer[L], rank_marks, table, p)
        n_zero_total += n_zero
        sentences.append(sentence)
    ax.set_yscale("log")
    ax.set_xlabel("principal component index i (1 = largest variance)")
    ax.set_ylabel("singular value sigma_i of the centred residual\n(residual units, log scale)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    _rank_legends(ax, rank_marks)
    if len(report.layers) == 1:
        notes.append("Only one layer was analysed, so there is no change with depth to show.")
    if n_zero_total:
        notes.append(f"{n_zero_total} exactly-zero singular value(s) beyond the sample's rank are not "
                     "drawn on the log axis.")
    n_rows = metrics[0].n_positions
    alt = (f"Log-scale singular-value spectra at {len(chosen)} of {len(report.layers)} layers "
           f"({', '.join(map(str, chosen))}), {n_rows} positions "
           f"({'without' if which == 'without_massive' else 'including'} massive rows), "
           f"d_model {report.d_model}. " + " ".join(sentences))
    return _finish(fig, alt, table, title, notes)


def _spectrum_line(ax, i, L, m, rank_marks, table, p) -> tuple[int, str]:
    """Draw layer ``L``'s spectrum with its rank markers, add its rows to ``table``; return the number
    of exactly-zero singular values (not drawable on a log axis) and the alt-text sentence."""
    lam = np.asarray(m.eigenvalues, dtype=float)
    sig = np.sqrt(np.clip(lam, 0, None))
    share = lam / lam.sum()
    cum = np.cumsum(share)
    for k, (s, sh, c) in enumerate(zip(sig, share, cum), start=1):
        table.append({"layer": L, "component": k, "singular_value": float(s),
                      "variance_share": float(sh), "cumulative_share": float(c)})
    pos = sig > 0
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
    return int((~pos).sum()), (
        f"Layer {L}: sigma falls from {format_number(nz[0])} to {format_number(nz[-1])} over "
        f"{int(pos.sum())} non-zero components; r{p} = {m.variance_rank}, participation ratio "
        f"{format_number(m.participation_ratio)}, stable rank {format_number(m.stable_rank)}, "
        f"entropy rank {format_number(m.entropy_rank)}.")


def _rank_legends(ax, rank_marks) -> None:
    """Two legends: the layers (colour + line style) and the rank markers."""
    layer_legend = ax.legend(title="layer (colour + line style)", loc="upper right")
    ax.add_artist(layer_legend)
    proxies = [Line2D([], [], color="black", marker=mk, linestyle="none", markersize=8 if mk != "|" else 12,
                      markerfacecolor="white" if mk != "|" else "black", label=lab)
               for _, lab, mk in rank_marks]
    ax.legend(handles=proxies, title="rank markers (on each curve)", loc="lower left")


@styled
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
    _cumulative_legend(ax, chosen, variants, pp)
    if len(report.layers) == 1:
        notes.append("Only one layer was analysed.")
    alt = (f"Cumulative share of variance against the number of principal components k, at layers "
           f"{', '.join(map(str, chosen))} (d_model {report.d_model}), with a dashed line at {pp}%. "
           + " ".join(sentences))
    return _finish(fig, alt, table, title, notes)


def _cumulative_legend(ax, chosen, variants, pp) -> None:
    """Layers (colour + marker), the two position sets (line style) and the r_p tick."""
    handles = [Line2D([], [], color=_style(i)["color"], marker=_style(i)["marker"], label=f"layer {L}")
               for i, L in enumerate(chosen)]
    handles += [Line2D([], [], color="0.3", linestyle=ls, label=lab) for _, lab, ls in variants]
    handles += [Line2D([], [], color="black", marker="|", markersize=12, linestyle="none",
                       label=f"r{pp}: first k at or above the line")]
    ax.legend(handles=handles, loc="lower right")


@styled
def plot_rank_by_layer(report) -> AccessibleFigure:
    """Effective-rank family by layer (positions with massive activations left out), plus r_p with them."""
    layers, p = _report_layers(report)
    title = f"How many of {report.d_model} residual dimensions are used, by layer"
    n = max((m.n_positions for m in report.all_positions), default=0)
    n_kept = min((m.n_positions for m in report.without_massive), default=n)
    if layers and not width_rule(n, report.d_model)["can_judge_width"]:   # Section 8's rule
        title += f" (capped by the sample: {n} positions" + (f", {n_kept} without massive rows)" if n_kept < n else ")")
    if not layers:
        return _placeholder(title, "The report has no layers.", "layer", "dimensions")
    series = {
        f"r{p} (variance rank), all positions": [m.variance_rank for m in report.all_positions],
        f"r{p}, without massive positions": [m.variance_rank for m in report.without_massive],
        "entropy effective rank": [m.entropy_rank for m in report.without_massive],
        "participation ratio": [m.participation_ratio for m in report.without_massive],
        "stable rank": [m.stable_rank for m in report.without_massive],
    }
    fig, ax = _layer_lines(layers, series, title, "layer (block index, resid_post)",
                           "dimensions (log scale)")
    ax.set_yscale("log")
    notes = _one_layer_note(layers)
    clean = series[f"r{p}, without massive positions"]
    allp = series[f"r{p} (variance rank), all positions"]
    lo, hi = int(np.argmin(clean)), int(np.argmax(clean))
    alt = (f"Line chart over {len(layers)} layers. Without massive rows, the "
           f"{p}%-variance rank ranges from {clean[lo]} (layer {layers[lo]}) to {clean[hi]} "
           f"(layer {layers[hi]}) of {report.d_model} dimensions; with them it ranges from "
           f"{min(allp)} to {max(allp)}. Participation ratio ranges "
           f"{min(series['participation ratio']):.1f}-{max(series['participation ratio']):.1f}, "
           f"stable rank {min(series['stable rank']):.2f}-{max(series['stable rank']):.2f}.")
    table = [{"layer": layers[i], **{k: (float(v[i]) if isinstance(v[i], float) else v[i])
                                     for k, v in series.items()}} for i in range(len(layers))]
    return _finish(fig, alt, table, title, notes)


@styled
def plot_utilization_by_layer(report) -> AccessibleFigure:
    """Utilization by layer against both denominators, with and without massive positions.

    ``r_p / min(n, d)`` is the share of the directions this *sample* can span (n positions); ``r_p / d``
    is the share of the residual width. With fewer positions than dimensions only the first can be
    large; reporting both keeps the seed's checkpoint-3 confusion (15 / 48) from happening again.
    """
    layers, p = _report_layers(report)
    title = f"Utilization of the residual stream by layer (r{p} as a share)"
    if not layers:
        return _placeholder(title, "The report has no layers.", "layer", "utilization (%)")
    series = {
        f"r{p} / min(n, d), without massive": [100 * m.utilization_available for m in report.without_massive],
        f"r{p} / min(n, d), all positions": [100 * m.utilization_available for m in report.all_positions],
        f"r{p} / d_model, without massive": [100 * m.utilization_d_model for m in report.without_massive],
        f"r{p} / d_model, all positions": [100 * m.utilization_d_model for m in report.all_positions],
    }
    fig, ax = _layer_lines(layers, series, title, "layer (block index)", "utilization (% of the denominator)")
    ax.set_ylim(0, 105)
    notes = _one_layer_note(layers)
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


@styled
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
                   edgecolors="black", linewidths=1.5, label="massive row (ring)", zorder=3)
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
           f"{len(flagged)} layer(s) have a massive row (norm >= the threshold; ringed).")
    table = [{"layer": L, "median_norm": med[i], "max_norm": top[i], "max_over_median": float(ratio[i]),
              "loudest": who[i], "massive": L in flagged} for i, L in enumerate(layers)]
    return _finish(fig, alt, table, title, notes)


@styled
def plot_norm_heatmap(capture, report=None, prompt: int = 0, kind: str | None = None,
                      massive_ratio: float = 4.0, max_positions: int = 64) -> AccessibleFigure:
    """Residual norm ``||x||`` by layer (rows) and position (columns, tokens as labels) for one prompt.

    Colour is the norm on a log scale (cividis). A star marks a massive activation: a norm at least
    ``massive_ratio`` times the layer's median norm over *all* captured positions (the analyzer's
    definition; when ``report`` is given its ``massive`` list is used as is, so the figure and the
    report agree).
    Table: one row per (layer, position): norm, ratio to the layer median, massive flag.
    """
    from ..capture import ResidualCapture
    if not isinstance(capture, ResidualCapture):
        raise BandwidthInputError(f"capture: expected a ResidualCapture, got {type(capture).__name__}")
    if report is not None:
        _check_report(report)
    kind = kind or (report.kind if report is not None else "resid_post")
    prompt = _int(prompt, "prompt")
    max_positions = _positive_int(max_positions, "max_positions")
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
    grid, ratio, mass = _norm_grid(capture, kind, rows, report, massive_ratio)
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
           label=f"massive row (norm >= {format_number(massive_ratio)}x layer median)")
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
    alt = _norm_heatmap_alt(prompt, capture.n_rows, layers, positions, tokens, (grid, ratio), (xs, ys))
    table = [{"layer": L, "position": positions[c], "token": tokens[c], "norm": float(grid[r, c]),
              "ratio_to_layer_median": float(ratio[r, c]), "massive": bool(mass[r, c])}
             for r, L in enumerate(layers) for c in range(len(rows))]
    return _finish(fig, alt, table, title, notes)


def _norm_grid(capture, kind, rows, report, massive_ratio):
    """``(norms [layer, position], ratio to the layer's median over all captured rows, massive flags)``;
    the massive flags are the report's when it is of the same kind (so figure and report agree)."""
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
    return grid, ratio, mass


def _norm_heatmap_alt(prompt, n_captured, layers, positions, tokens, grids, glyphs) -> str:
    """Alt text: the median norm over depth, the largest norm and where, the massive positions."""
    grid, ratio = grids
    xs, ys = glyphs
    med_pos = np.median(grid, axis=1)
    li, pi = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
    massive_cols = sorted(set(xs.tolist()))
    mass_txt = "; ".join(
        f"position {positions[c]} {tokens[c]!r} is massive at layers {format_ranges([layers[y] for y in ys[xs == c]])}"
        for c in massive_cols[:4]) or "no position is massive"
    return (f"Heatmap of residual norms for prompt {prompt} ({len(positions)} positions x {len(layers)} layers, "
            f"log colour scale). The median norm over this prompt's positions goes from "
            f"{format_number(float(med_pos[0]))} at layer {layers[0]} to {format_number(float(med_pos[-1]))} "
            f"at layer {layers[-1]}. The largest norm is {format_number(float(grid[li, pi]))} at layer "
            f"{layers[li]}, position {positions[pi]} {tokens[pi]!r}, "
            f"{format_number(float(ratio[li, pi]))} times that layer's median over all "
            f"{n_captured} captured positions. {mass_txt[:1].upper() + mass_txt[1:]} (stars).")


# =============================================================================================
# The explorer's figure (one prompt, one layer)
# =============================================================================================
@styled
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
    _explorer_norms(ax, capture, rows, (norms, median, mass_rows), massive_ratio, excluded, prompt)
    _explorer_cumulative(bx, used, other, excluded, p)
    ranks = _explorer_ranks(cx, report, layer, used, excluded)
    fig.suptitle(title)
    if len(rows) == 1:
        notes.append("The prompt has a single token.")
    alt = _explorer_alt(capture, rows, (norms, median, mass_rows), (layer, prompt, excluded, pp), used, other, ranks)
    return _finish(fig, alt, report_rows(report, selected=layer), title, notes)


def _explorer_norms(ax, capture, rows, measured, massive_ratio, excluded, prompt) -> None:
    """Panel 1: the norm per position; massive ones hatched and starred, median and threshold lines."""
    norms, median, mass_rows = measured
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


def _explorer_cumulative(bx, used, other, excluded, p) -> None:
    """Panel 2: cumulative variance of the analysed positions (and of all positions), r_p marked."""
    pp = round(100 * p)
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


def _explorer_ranks(cx, report, layer, used, excluded) -> list[int]:
    """Panel 3: r_p across layers with the chosen one ringed; returns the ranks drawn."""
    pp = round(100 * report.variance_threshold)
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
    return ranks


def _explorer_alt(capture, rows, measured, where, used, other, ranks) -> str:
    """Alt text: the massive positions, r_p of this layer (and with massive positions), r_p over depth."""
    norms, median, mass_rows = measured
    layer, prompt, excluded, pp = where
    loud = [r for r in rows if r in mass_rows]
    loud_txt = ("; ".join(f"position {int(capture.position[r])} {capture.tokens[r]!r} is massive (norm "
                          f"{format_number(float(norms[r]))} = {format_number(float(norms[r] / median))} "
                          f"times the median {format_number(median)})" for r in loud[:3])
                + (", excluded from the spectrum." if excluded else ", kept in the spectrum.")
                if loud else "No position is massive at this layer.")
    return (f"Prompt {prompt}, {len(rows)} tokens, layer {layer}. {loud_txt} With {used.n_positions} "
            f"positions analysed, {pp}% of the variance lies in r{pp} = {used.variance_rank} of "
            f"min(n, d) = {min(used.n_positions, used.d_model)} available directions (utilization "
            f"{format_percent(used.utilization_available)}; {format_percent(used.utilization_d_model)} of "
            f"d_model {used.d_model}{'' if width_rule(used.n_positions, used.d_model)['can_judge_width'] else ', not judgeable: fewer than d_model + 1 positions'})"
            + (f"; with the massive position(s) included r{pp} = {other.variance_rank}" if other else "")
            + f". Across layers r{pp} ranges {min(ranks)} to {max(ranks)}.")


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


