"""The bandwidth monitor's timeline figure (per-request metrics, thresholds and alerts)."""
from __future__ import annotations

import math
from collections import Counter
from typing import Mapping

from matplotlib.lines import Line2D

from ..monitor import ALERT_KEYS, TIMELINE_KEYS, threshold_direction
from ..validation import BandwidthInputError
from .core import (AccessibleFigure, format_number, styled, _figure, _finish, _nothing, _num, _placeholder,
                   _positive_int, _records, _sorted_values, _style)


#: How an alert is drawn on the timeline: (marker, face colour, legend text).
ALERT_GLYPHS = {
    "warning": ("^", "white", "warning alert (open triangle)"),
    "critical": ("X", "black", "critical alert (filled cross)"),
    "resolved": ("o", "none", "alert resolved (open circle)"),
}


def _layer_name(layer) -> str:
    return "request-level" if layer is None else f"layer {layer}"


@styled
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
    recs, alts, thresholds, directions = _timeline_inputs(records, alerts, thresholds, directions)
    max_metrics = _positive_int(max_metrics, "max_metrics")
    title = "Bandwidth monitor timeline"
    if not recs:
        return _placeholder(title, _nothing("monitor records"), "request", "value")
    present = list(dict.fromkeys(r["metric"] for r in recs))
    chosen, notes = _timeline_metrics(present, metrics, thresholds, max_metrics)
    fig, axes = _figure((9, 2.6 + 2.4 * len(chosen)), nrows=len(chosen), sharex=True)
    layers = _sorted_values({r["layer"] for r in recs})
    sentences, table = [], []
    alert_at = {(a["request"], str(a["layer"]), a["metric"]): a["level"] for a in alts}
    for ax, metric in zip(axes[:, 0], chosen):
        mrecs = [r for r in recs if r["metric"] == metric]
        th = thresholds.get(metric, {})
        _timeline_panel(ax, metric, mrecs, layers, th, alts)
        sentences.append(_timeline_sentence(metric, mrecs, th, directions, notes))
        table += [{"request": r["request"], "timestamp": r["timestamp"], "layer": r["layer"],
                   "metric": metric, "value": r["value"],
                   "alert": alert_at.get((r["request"], str(r["layer"]), metric), "")}
                  for r in sorted(mrecs, key=lambda r: (r["request"], str(r["layer"])))]
    axes[-1, 0].set_xlabel("request number (in arrival order)")
    fig.suptitle(title)
    fig.legend(handles=_timeline_legend(layers), loc="outside right upper", fontsize=8)
    reqs = [r["request"] for r in recs]
    if min(reqs) == max(reqs):
        notes.append("Only one request was recorded, so there is no timeline yet.")
    names = [_layer_name(L) for L in layers]
    alt = (f"Monitor timeline over requests {min(reqs)}-{max(reqs)} ({len(set(reqs))} requests), "
           f"{len(layers)} series: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}. "
           + " ".join(sentences) + f" {_alert_text([a for a in alts if a['metric'] in chosen])}.")
    return _finish(fig, alt, table, title, notes)


def _timeline_inputs(records, alerts, thresholds, directions):
    """Checked records, alerts, thresholds and directions (metrics as strings)."""
    recs = _records(records, TIMELINE_KEYS, "monitor records", ints=("request",), nums=("value",))
    alts = _records(alerts, ALERT_KEYS, "alerts", ints=("request",), nums=("value",),
                    choices={"level": list(ALERT_GLYPHS)})
    thresholds = {} if thresholds is None else thresholds
    if not isinstance(thresholds, Mapping) or any(not isinstance(v, Mapping) for v in thresholds.values()):
        raise BandwidthInputError("thresholds: expected {metric: {'warning': w, 'critical': c}}")
    directions = {} if directions is None else dict(directions)
    bad_dir = {m: d for m, d in directions.items() if d not in ("above", "below")}
    if bad_dir:
        raise BandwidthInputError(f"directions: expected 'above' or 'below', got {bad_dir}")
    for r in recs + alts:
        r["metric"] = str(r["metric"])
    return recs, alts, thresholds, directions


def _timeline_metrics(present, metrics, thresholds, max_metrics) -> tuple[list, list]:
    """The metrics drawn (those with thresholds first: they alert) and the note on any left out."""
    if metrics is None:
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
    return chosen, notes


def _timeline_panel(ax, metric, mrecs, layers, th, alts) -> None:
    """One metric's panel: a line per layer, the threshold lines with their values, alert glyphs."""
    for i, L in enumerate(layers):
        pts = sorted((r["request"], r["value"]) for r in mrecs if r["layer"] == L)
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, markersize=4, linewidth=1.3, markevery=max(1, len(x) // 20), **_style(i))
    for level, val, ls, lw in (("warning", th.get("warning"), "--", 1.3), ("critical", th.get("critical"), "-.", 1.8)):
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


def _timeline_sentence(metric, mrecs, th, directions, notes) -> str:
    """The alt-text sentence of one panel: range, worst value and thresholds (notes get constant or
    empty series)."""
    w, c = th.get("warning"), th.get("critical")
    worse_above = directions.get(metric, threshold_direction(w, c)) == "above"
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
              f"{format_number(c) if c is not None else 'none'} "
              f"({'higher is worse' if worse_above else 'lower is worse'})")
    return s + "."


def _timeline_legend(layers) -> list:
    handles = [Line2D([], [], markersize=5, label=_layer_name(L), **_style(i)) for i, L in enumerate(layers)]
    handles += [Line2D([], [], color="black", linestyle="--", label="warning threshold (dashed)"),
                Line2D([], [], color="black", linestyle="-.", linewidth=1.8, label="critical threshold (dash-dot)")]
    return handles + [Line2D([], [], marker=m, linestyle="none", markersize=9, markerfacecolor=face,
                             markeredgecolor="black", label=lab) for m, face, lab in ALERT_GLYPHS.values()]


def _alert_text(shown_alerts) -> str:
    """``N alert(s): a warning, b critical, c resolved; the first critical alert is at ...``."""
    counts = Counter(a["level"] for a in shown_alerts)
    text = f"{len(shown_alerts)} alert(s): " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ALERT_GLYPHS)
    first_c = min((a for a in shown_alerts if a["level"] == "critical"), key=lambda a: a["request"], default=None)
    if first_c:
        text += (f"; the first critical alert is at request {first_c['request']} "
                 f"({_layer_name(first_c['layer'])}, {first_c['metric']} = {format_number(first_c['value'])}, "
                 f"threshold {format_number(_num(first_c['threshold'], 'threshold'))})")
    return text
